# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.reference: the reference process (noise schedule, prior, step codes)."""

import math

import pytest
import torch

from pyro_osds.ops.reference import ReferenceProcess
from tests.common import D64


def test_cosine_schedule_endpoints_and_monotone():
    p = ReferenceProcess()
    codes = torch.arange(0, p.grid_size + 1, dtype=D64)
    beta = p.beta(codes)
    assert beta[0] == pytest.approx(0.5 * p.sigma_min, abs=1e-12)
    # beta(T) = (sigma_max - sigma_min)/2 cos^2(pi/2 s/(1+s)) + sigma_min/2
    expected_top = 0.5 * (p.sigma_max - p.sigma_min) * math.cos(0.5 * math.pi * p.cosine_s / (1 + p.cosine_s)) ** 2
    assert beta[-1] == pytest.approx(expected_top + 0.5 * p.sigma_min, abs=1e-12)
    assert beta[-1] == pytest.approx(4.9999, abs=1e-3)
    assert bool((beta[1:] > beta[:-1]).all())


def test_cosine_schedule_integral_matches_digest():
    # algorithm.md A.1: integral of beta over [0, 1] is about 2.483
    p = ReferenceProcess()
    tau = torch.linspace(0, 1, 200_001, dtype=D64)
    integral = torch.trapezoid(p.beta(tau * p.grid_size), tau)
    assert float(integral) == pytest.approx(2.483, abs=1e-3)


def test_linear_schedule_endpoints():
    p = ReferenceProcess(schedule="linear", grid_size=128)
    assert p.beta(0.0) == pytest.approx(0.005)
    assert p.beta(float(p.grid_size)) == pytest.approx(5.0)
    assert p.beta(64.0) == pytest.approx(0.5 * (0.01 + 9.99 * 0.5))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_float_and_tensor_codes_agree(schedule):
    p = ReferenceProcess(schedule=schedule, prior_scale=0.3)
    for c in [0, 1, 17.5, 64, 128]:
        assert p.beta(c) == pytest.approx(float(p.beta(torch.tensor(c, dtype=D64))), abs=1e-14)
        assert p.sigma(c) == pytest.approx(0.3 * math.sqrt(p.beta(c)), abs=1e-14)
        assert p.sigma(c) == pytest.approx(float(p.sigma(torch.tensor(c, dtype=D64))), abs=1e-14)


def test_prior_log_prob_matches_torch_distributions():
    p = ReferenceProcess(prior_scale=1.7)
    x = torch.randn(50, 6, dtype=D64) * 3
    expected = torch.distributions.Normal(torch.tensor(0.0, dtype=D64), torch.tensor(1.7, dtype=D64)).log_prob(x).sum(-1)
    torch.testing.assert_close(p.prior_log_prob(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.prior_score(x), -x / 1.7**2)


def test_prior_draws_clip_only_when_asked():
    p = ReferenceProcess(prior_scale=2.0, prior_clip=1.0)
    x = p.sample_prior(20_000, 3, dtype=D64)
    assert float(x.abs().max()) > 2.0
    assert float(x.std()) == pytest.approx(2.0, rel=0.03)
    clipped = p.sample_prior(20_000, 3, clip=True, dtype=D64)
    assert float(clipped.abs().max()) <= 2.0


def test_step_codes_validation():
    p = ReferenceProcess(grid_size=128)
    assert p.step_codes(1) == 128
    assert p.step_codes(4) == 32
    with pytest.raises(ValueError, match="does not divide the fine grid"):
        p.step_codes(3)
    for bad in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="`num_steps` must be an integer >= 1"):
            p.step_codes(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid_size": 0}, "grid_size"),
        ({"schedule": "quadratic"}, "schedule"),
        ({"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_min"),
        ({"prior_scale": 0.0}, "prior_scale"),
        ({"prior_clip": -1.0}, "prior_clip"),
    ],
)
def test_invalid_reference_process(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceProcess(**kwargs)
