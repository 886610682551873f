# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of the scaling and end-to-end benchmarks: their exact references, potentials and command lines."""

import json
import math

import pytest
import scipy.integrate
import torch
from pyro.infer.mcmc.util import initialize_model

from benchmarks.end_to_end import get_model, linear_log_z, poisson_potential
from benchmarks.end_to_end import main as end_to_end_main
from benchmarks.scaling import (
    get_scaling_target,
    hierarchical_log_z,
    laplace_smc_reference,
    logistic_potential,
)
from benchmarks.scaling import main as scaling_main
from tests.common import D64


def _pyro_potential(case):
    """The model's potential by Pyro's own machinery, on the flat vector of its sites in trace order."""
    _, potential_fn, transforms, _ = initialize_model(case.model, case.model_args)
    return potential_fn, transforms


def test_hierarchical_log_z_matches_quadrature_of_the_multivariate_marginal():
    # independent route: y | tau ~ N(0, s0^2 11^T + diag(tau^2 + sigma^2)) (mu integrated), then quad over tau
    g = torch.Generator().manual_seed(0)
    sigma = 0.5 + torch.rand(5, dtype=D64, generator=g)
    y = torch.randn(5, dtype=D64, generator=g) + 1.0

    def integrand(tau):
        cov = 25.0 * torch.ones(5, 5, dtype=D64) + torch.diag(tau**2 + sigma**2)
        log_lik = torch.distributions.MultivariateNormal(torch.zeros(5, dtype=D64), cov).log_prob(y)
        prior = 2 * torch.distributions.Normal(0.0, 2.0).log_prob(torch.tensor(tau, dtype=D64)).exp()
        return float(log_lik.exp() * prior)

    value, _ = scipy.integrate.quad(integrand, 0, 60, limit=200, epsabs=0, epsrel=1e-11)
    assert hierarchical_log_z(y, sigma) == pytest.approx(math.log(value), abs=1e-7)


def test_linear_log_z_matches_two_dimensional_quadrature():
    x = torch.tensor([[1.0], [0.5], [-1.2]], dtype=D64)
    y = torch.tensor([0.7, 0.1, -1.0], dtype=D64)

    def joint(beta, sigma):  # beta ~ N(0, 2^2), sigma ~ HalfNormal(1), y ~ N(x beta, sigma^2)
        resid = y - x[:, 0] * beta
        log = (-0.5 * beta**2 / 4 - 0.5 * math.log(2 * math.pi * 4) + math.log(2) - 0.5 * sigma**2
               - 0.5 * math.log(2 * math.pi) - 0.5 * float((resid**2).sum()) / sigma**2
               - 1.5 * math.log(2 * math.pi * sigma**2))
        return math.exp(log)

    value, _ = scipy.integrate.dblquad(lambda b, s: joint(b, s), 1e-6, 8, -12, 12, epsabs=0, epsrel=1e-10)
    assert linear_log_z(x, y) == pytest.approx(math.log(value), abs=1e-6)


@pytest.mark.parametrize("name", ["logreg6", "poisson"])
def test_reference_potentials_are_the_pyro_models(name):
    case = get_scaling_target(name) if name.startswith("logreg") else get_model(name)
    ours = logistic_potential(*case.model_args) if name.startswith("logreg") else poisson_potential(*case.model_args)
    potential_fn, _ = _pyro_potential(case)
    points = torch.randn(4, case.dim, dtype=D64, generator=torch.Generator().manual_seed(1))
    site = "w" if name.startswith("logreg") else "beta"
    expected = torch.stack([potential_fn({site: p}) for p in points])
    torch.testing.assert_close(ours(points), expected, rtol=1e-12, atol=1e-9)


def test_laplace_smc_reference_on_a_gaussian():
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=D64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=D64)
    precision = torch.linalg.inv(cov)

    def potential(x):
        r = x - mean
        return 0.5 * ((r @ precision) * r).sum(-1) + 1.5 + 0.1 * (r**4).sum(-1)  # not Gaussian: SMC has work to do

    log_z, se, _ = laplace_smc_reference(potential, 3, seed=0, num_particles=512)
    grid = torch.linspace(-6, 6, 121, dtype=D64)
    pts = torch.cartesian_prod(grid, grid, grid) + mean
    exact = float(torch.logsumexp(-potential(pts), 0)) + 3 * math.log(float(grid[1] - grid[0]))
    assert abs(log_z - exact) < 4 * se + 1e-3, (log_z, se, exact)


def test_scaling_and_end_to_end_command_lines(tmp_path):
    torch.set_num_threads(1)
    common = ["--nuts-warmup", "20", "--nuts-samples", "30", "--seed", "0"]
    assert scaling_main(["--targets", "logreg4", "--draws", "300", "--out", str(tmp_path), *common]) == 0
    results = json.loads((tmp_path / "scaling.json").read_text())
    row = results["rows"][0]
    assert row["name"] == "logreg4" and row["dim"] == 4 and row["rows"] == 12
    assert abs(row["osds"]["log_z"] - row["reference"]["log_z"]) < 0.1
    assert row["nuts"]["time_to_1000_ess_s"] > 0 and "| logreg4 | 4 |" in (tmp_path / "scaling.md").read_text()
    assert end_to_end_main(["--models", "eight_schools", "--draws", "300", "--out", str(tmp_path), *common]) == 0
    table = (tmp_path / "end_to_end.md").read_text()
    assert "| eight_schools | 10 | -31.311" in table
