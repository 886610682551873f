# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.util: argument checks, warnings at the user's line, seeded generators."""

import pytest
import torch

from pyro_osds.ops.precondition import PreconditionConfig, choose_preconditioner
from pyro_osds.util import (
    check_choice,
    check_number,
    check_positive_int,
    derive_seed,
    raise_device_errors,
    seeded_generator,
    tensor_on_its_device,
)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3", None])
def test_check_positive_int(bad):
    with pytest.raises(ValueError, match="`n` must be an integer >= 1"):
        check_positive_int("n", bad)
    check_positive_int("n", 0, minimum=0)


def test_check_number_and_choice():
    check_number("x", 0.5, low=0, high=1)
    for bad, match in [(True, "a number"), ("1", "a number"), (0.0, "must be > 0"), (2.0, "must be <= 1")]:
        with pytest.raises(ValueError, match=match):
            check_number("x", bad, low=0, high=1, low_open=True)
    with pytest.raises(ValueError, match=r"`kind` must be one of \('a', 'b'\), got 'c'"):
        check_choice("kind", "c", ("a", "b"))


def test_warnings_point_at_the_users_line():
    # a warning raised deep inside the package (the preconditioner) is attributed to this file
    with pytest.warns(RuntimeWarning, match="No Laplace fit converged") as record:
        choose_preconditioner(lambda x: -(x**2).sum(-1), torch.ones(2, dtype=torch.float64),
                              PreconditionConfig(num_iterations=1, mode_search_starts=0))
    assert record[0].filename == __file__


def test_generators_are_seeded_from_their_parent():
    a = seeded_generator("cpu", derive_seed(torch.Generator().manual_seed(1)))
    b = seeded_generator("cpu", derive_seed(torch.Generator().manual_seed(1)))
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    torch.manual_seed(7)
    c = seeded_generator("cpu")
    torch.manual_seed(7)
    assert torch.equal(torch.randn(3, generator=c), torch.randn(3, generator=seeded_generator("cpu")))


def test_errors_of_the_device_are_never_taken_for_the_models():
    # torch's own errors: tensors on two devices, a generator elsewhere (the texts seen on an H100), out of memory
    device_errors = [
        "Expected all tensors to be on the same device, but got mat is on cuda:0, different from other tensors on cpu",
        "indices should be either on cpu or on the same device as the indexed tensor (cpu)",
        "Expected a 'cuda' device type for generator but found 'cpu'",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
    ]
    for text in device_errors:
        with pytest.raises(RuntimeError, match=text[:20]):
            raise_device_errors(RuntimeError(text))
    with pytest.raises(RuntimeError):  # a real one, made on this machine
        try:
            torch.zeros(3, device="meta") + torch.zeros(3)
        except RuntimeError as err:
            raise_device_errors(err)
    for model_error in (RuntimeError("linalg.cholesky: The factorization could not be completed because the input is "
                                     "not positive-definite (the leading minor of order 2 is not positive-definite)."),
                        ValueError("Expected parameter loc to satisfy the constraint Real()")):
        raise_device_errors(model_error)  # the model's: not raised


def test_a_tensor_keeps_its_device_under_another_default_device():
    x = torch.arange(3.0)
    torch.set_default_device("meta")
    try:
        assert tensor_on_its_device(x) is x and torch.as_tensor(x).device.type == "meta"  # what it avoids
        assert tensor_on_its_device([1.0, 2.0]).device.type == "cpu"
        assert tensor_on_its_device(x, dtype=torch.float64).device.type == "cpu"
    finally:
        torch.set_default_device(None)
