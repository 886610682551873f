# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.target: the bare-potential adapter (initial_params, vectorisation, transforms)."""

import math

import pytest
import torch

from pyro_osds import OSDS
from tests.common import D64, MU, SD, fitted, potential


@pytest.mark.parametrize(
    "initial_params, error, match",
    [
        ({}, ValueError, "non-empty dict"),
        ({"x": [0.0, 1.0]}, TypeError, "must be a torch.Tensor"),
        ({"x": torch.zeros(3, dtype=torch.long)}, TypeError, "floating point"),
        ({"x": torch.tensor([0.0, math.nan, 0.0])}, ValueError, "NaN or infinite"),
        ({"x": torch.zeros(3), "y": torch.zeros(2, dtype=D64)}, ValueError, "one dtype and device"),
    ],
)
def test_bad_initial_params(initial_params, error, match):
    with pytest.raises(error, match=match):
        OSDS(potential_fn=potential, initial_params=initial_params, preset="smoke").run()


def test_potential_must_be_scalar_and_finite():
    with pytest.raises(ValueError, match="must return a scalar"):
        OSDS(potential_fn=lambda p: p["x"] ** 2, initial_params={"x": torch.zeros(3)}, preset="smoke").run()
    with pytest.raises(ValueError, match="not finite near `initial_params`"):
        OSDS(potential_fn=lambda p: p["x"].sum() * math.inf, initial_params={"x": torch.zeros(3)},
             preset="smoke").run()


def test_transforms_map_draws_back():
    exp = torch.distributions.transforms.ExpTransform()
    osds = fitted(transforms={"x": exp.inv})
    samples = osds.get_samples()["x"]
    assert bool((samples > 0).all())
    unconstrained = osds.get_samples(unconstrained=True)["x"]
    torch.testing.assert_close(samples, unconstrained.exp())


def test_non_vmappable_potential_falls_back_to_a_loop():
    def item_potential(params):
        x = params["x"]
        if float(x.detach().sum()) > 1e9:  # data-dependent control flow: not vmappable
            return x.sum()
        return potential(params)

    with pytest.warns(UserWarning, match="could not be vectorised"):
        osds = fitted(potential_fn=item_potential, num_iterations=2, num_chains=1)
    assert osds.target.vectorize == "loop"
    assert osds.get_samples()["x"].shape == (300, 3)


def test_batched_potential_flag():
    def batched(params):
        return 0.5 * (((params["x"] - MU) / SD) ** 2).sum(-1)

    osds = fitted(potential_fn=batched, batched_potential=True, num_iterations=2, num_chains=1)
    assert osds.target.vectorize == "batched"
    assert math.isfinite(osds.log_evidence().log_z)
