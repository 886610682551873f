# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Fast checks of the benchmark targets in ``benchmarks/targets.py``: bare potential == Pyro potential,
exact log Z where it is cheap to verify, exact samplers, and the stored references.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import torch
from pyro.infer.mcmc.util import initialize_model

from benchmarks.gold_standard import (
    _brownian_conditional_moments,
    brownian_log_lik,
    seeds_marginal_log_lik,
)
from benchmarks.targets import BAYESIAN_TARGETS, TARGETS, get_target, many_well_log_z_1d

ROOT = Path(__file__).resolve().parents[1]

D64 = torch.float64
REFERENCES = ROOT / "benchmarks" / "references.json"

#: scale of the random test points (unconstrained coordinates) per target
POINT_SCALE = {"gmm40_50d": 20.0, "student_t_mixture_50d": 5.0, "many_well32": 1.5, "gmm9_2d": 4.0}


def _random_points(name, n=5):
    t = get_target(name)
    x = POINT_SCALE.get(name, 1.0) * torch.randn(n, t.dim, dtype=D64)
    if name == "brownian":
        x[:, :2] = -2.0 + 0.5 * torch.randn(n, 2, dtype=D64)  # log-scales near the posterior
        x[:, 2:] = 0.3 * x[:, 2:]
    if name == "seeds":
        x[:, -1] = 1.0 + torch.randn(n, dtype=D64)  # log tau
    return x


def test_registry():
    assert set(BAYESIAN_TARGETS) <= set(TARGETS)
    assert len(TARGETS) == 24
    assert TARGETS["funnel10"] is get_target("funnel10")
    with pytest.raises(KeyError, match="unknown target"):
        get_target("nope")
    for name in TARGETS:
        t = TARGETS[name]
        assert t.name == name and len(t.labels) == t.dim
        assert (t.log_z is None) == (name in BAYESIAN_TARGETS)


@pytest.mark.parametrize("name", list(TARGETS))
def test_potential_matches_pyro_model(name):
    t = get_target(name)
    _, potential_fn, _, _ = initialize_model(t.model, t.model_args)
    x = _random_points(name)
    x_before = x.clone()
    u = t.potential(x)
    assert u.shape == (x.shape[0],) and u.dtype == D64
    assert torch.equal(x, x_before)  # no in-place modification of the input
    u_pyro = torch.stack([potential_fn(t.to_sites(xi)) for xi in x])
    assert torch.allclose(u, u_pyro, rtol=1e-11, atol=1e-9)
    # flat <-> site mapping round trip, batched and unbatched
    assert torch.equal(t.from_sites(t.to_sites(x)), x)
    assert torch.equal(t.from_sites(t.to_sites(x[0])), x[0])
    # batch consistency
    assert torch.allclose(t.potential(x[:1]), u[:1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["funnel10", "many_well32", "seeds", "brownian", "student_t_mixture_50d"])
def test_potential_twice_differentiable(name):
    t = get_target(name)
    x = _random_points(name, n=3).requires_grad_(True)
    (g,) = torch.autograd.grad(t.potential(x).sum(), x, create_graph=True)
    v = torch.randn_like(x)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    assert torch.isfinite(hv).all()
    # Hessian-vector product against a finite difference of the gradient
    eps = 1e-6
    xp = (x + eps * v).detach().requires_grad_(True)
    xm = (x - eps * v).detach().requires_grad_(True)
    (gp,) = torch.autograd.grad(t.potential(xp).sum(), xp)
    (gm,) = torch.autograd.grad(t.potential(xm).sum(), xm)
    assert torch.allclose(hv, (gp - gm) / (2 * eps), rtol=1e-5, atol=1e-5 * float(hv.abs().max()))


def test_funnel_exact_samples_and_log_z():
    t = get_target("funnel10")
    gen = torch.Generator().manual_seed(1)
    x = t.sample(20_000, generator=gen)
    # exact draws: weights exp(-U) / p_exact with p_exact written independently are all 1 (log Z = 0)
    zero = torch.tensor(0.0, dtype=D64)
    p_exact = torch.distributions.Normal(zero, 3.0).log_prob(x[:, 0]) + torch.distributions.Normal(
        zero, torch.exp(0.5 * x[:, :1])).log_prob(x[:, 1:]).sum(-1)
    assert torch.allclose(-t.potential(x), p_exact, rtol=1e-12, atol=1e-9)
    # moments of the sampler
    assert abs(float(x[:, 0].mean())) < 4 * 3 / math.sqrt(len(x))
    assert float(x[:, 0].std()) == pytest.approx(3.0, rel=0.03)
    assert float((x[:, 1:] * torch.exp(-0.5 * x[:, :1])).std()) == pytest.approx(1.0, rel=0.02)
    # IS with a wider proposal (x0 ~ N(0, 3.5^2), x_i | x0 ~ N(0, 1.3 e^{x0})): log Z = 0
    q0, q1 = torch.distributions.Normal(zero, 3.5), 1.3
    z0 = q0.sample((50_000,))
    z = torch.cat([z0[:, None], torch.sqrt(q1 * torch.exp(z0))[:, None] * torch.randn(50_000, 9, dtype=D64)], 1)
    log_q = q0.log_prob(z0) + torch.distributions.Normal(zero, torch.sqrt(q1 * torch.exp(z0))[:, None]).log_prob(
        z[:, 1:]).sum(-1)
    lw = -t.potential(z) - log_q
    w = torch.exp(lw - lw.max())
    se = float(w.std() / w.mean()) / math.sqrt(len(w))
    log_z = float(torch.logsumexp(lw, 0) - math.log(len(lw)))
    assert abs(log_z) < 4 * se + 1e-3


def test_gamma_poisson_log_z_by_quadrature_and_exact_draws():
    # log Z independently: each coordinate's integral of exp(-U_i(u)) over the log rate by quadrature
    t = get_target("gamma_poisson64")
    y = t.model_args[0]
    total = 0.0
    for count in y.tolist():
        def density(u, k=count):
            return math.exp((2 + k) * u - 2 * math.exp(u) - math.lgamma(k + 1))
        total += math.log(scipy.integrate.quad(density, -60, 6, epsabs=0, epsrel=1e-12, limit=200)[0])
    assert t.log_z == pytest.approx(total, abs=1e-8)
    # the exact draws' log weights -U - log p_exact are all log Z (p_exact: Gamma(2 + y, 2) on the log scale)
    x = t.sample(500, generator=torch.Generator().manual_seed(0))
    gamma = torch.distributions.Gamma(2.0 + y, 2.0)
    log_p = (gamma.log_prob(x.exp()) + x).sum(-1)
    torch.testing.assert_close(-t.potential(x) - log_p, torch.full((500,), t.log_z, dtype=D64), rtol=0, atol=1e-8)


def test_many_well_log_z_by_quadrature():
    t = get_target("many_well32")
    z1, _ = scipy.integrate.quad(lambda d: math.exp(-(-0.5 * d - 6 * d**2 + d**4)), -10, 10, epsabs=0,
                                 epsrel=1e-13, limit=200)
    assert z1 == pytest.approx(11784.50927, abs=1e-5)
    assert many_well_log_z_1d() == pytest.approx(math.log(z1), abs=1e-12)
    assert t.log_z == pytest.approx(16 * (math.log(11784.50927) + 0.5 * math.log(2 * math.pi)), abs=1e-8)
    assert t.log_z == pytest.approx(164.69568, abs=1e-5)
    # sign convention: the heavier well is at d > 0 (density exp(0.5 d + 6 d^2 - d^4))
    x = torch.zeros(2, 32, dtype=D64)
    x[0, 0], x[1, 0] = 1.7, -1.7
    u = t.potential(x)
    assert float(u[0]) < float(u[1])
    assert float(u[1] - u[0]) == pytest.approx(1.7, abs=1e-12)  # E(-d) - E(d) = -2 a d = d
    # sampler: P(d > 0) matches quadrature
    p_pos = scipy.integrate.quad(lambda d: math.exp(-(-0.5 * d - 6 * d**2 + d**4)), 0, 10)[0] / z1
    s = t.sample(20_000, generator=torch.Generator().manual_seed(2))
    frac = float((s[:, 0::2] > 0).double().mean())
    assert frac == pytest.approx(p_pos, abs=4 * math.sqrt(p_pos * (1 - p_pos) / s[:, 0::2].numel()))
    assert float(s[:, 1::2].var()) == pytest.approx(1.0, abs=0.03)


def test_gmm9_normalised_and_sample_moments():
    t = get_target("gmm9_2d")
    grid = torch.linspace(-12, 12, 1201, dtype=D64)
    g1, g2 = torch.meshgrid(grid, grid, indexing="ij")
    f = torch.exp(-t.potential(torch.stack([g1.flatten(), g2.flatten()], 1))).reshape(g1.shape)
    z = torch.trapezoid(torch.trapezoid(f, grid, dim=1), grid)
    assert float(z) == pytest.approx(1.0, abs=1e-9)  # log Z = 0
    s = t.sample(40_000, generator=torch.Generator().manual_seed(3))
    var = 0.3 + 50.0 / 3.0  # within-component variance + variance of the grid means {-5, 0, 5}
    assert torch.allclose(s.mean(0), torch.zeros(2, dtype=D64), atol=4 * math.sqrt(var / len(s)))
    assert torch.allclose(s.var(0), torch.full((2,), var, dtype=D64), rtol=0.03)
    # the samples sit in the 9 modes with std sqrt(0.3)
    resid = s - torch.round(s / 5) * 5
    assert float(resid.std()) == pytest.approx(math.sqrt(0.3), rel=0.02)


def test_mixture_means_are_seeded_as_documented():
    locs = torch.rand(40, 50, dtype=D64, generator=torch.Generator().manual_seed(0)) * 80 - 40
    t = get_target("gmm40_50d")
    assert float(t.potential(locs[:1])) == pytest.approx(-float(torch.logsumexp(
        torch.distributions.MultivariateNormal(locs, torch.eye(50, dtype=D64)).log_prob(locs[0]), 0)) + math.log(40),
        abs=1e-9)
    s = get_target("student_t_mixture_50d").sample(8, generator=torch.Generator().manual_seed(4))
    assert s.shape == (8, 50) and torch.isfinite(s).all()


def test_seeds_binomial_coefficients_and_marginal():
    t = get_target("seeds")
    r, n, _, _ = t.model_args
    log_binom = torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)
    assert float(log_binom.sum()) == pytest.approx(488.1736, abs=1e-4)
    # random effects integrated by adaptive Gauss-Hermite == brute-force 1-D integration of exp(-U)
    theta = torch.tensor([-0.55, 0.08, -0.82, 1.35, 2.5], dtype=D64)
    base = torch.cat([theta[:4], torch.zeros(21, dtype=D64), theta[4:]])
    u0 = t.potential(base[None])[0]
    grid = torch.linspace(-5, 5, 4001, dtype=D64)
    total = -u0
    for j in range(21):  # exp(-U) factorises over the b_j given theta
        x = base.repeat(len(grid), 1)
        x[:, 4 + j] = grid
        total = total + torch.log(torch.trapezoid(torch.exp(-(t.potential(x) - u0)), grid))
    assert float(seeds_marginal_log_lik(theta[None])[0]) == pytest.approx(float(total), abs=1e-8)


def test_brownian_kalman_likelihood():
    t = get_target("brownian")
    u = torch.tensor([[-2.0, -2.5], [-1.0, -3.0], [-3.0, -1.5]], dtype=D64)
    ll = brownian_log_lik(u[:, 0], u[:, 1])
    _, _, ll_dense = _brownian_conditional_moments(u[:, 0], u[:, 1])
    assert torch.allclose(ll, ll_dense, atol=1e-10)
    # the x-integral of exp(-U) at fixed scales is Gaussian, so Laplace is exact: it must equal the
    # Kalman likelihood plus the (log-space) prior of the scales
    for ui in u:
        def u_of_x(x, ui=ui):
            return t.potential(torch.cat([ui, x])[None])[0]

        x0 = torch.zeros(30, dtype=D64)
        hess = torch.autograd.functional.hessian(u_of_x, x0)
        grad = torch.autograd.functional.jacobian(u_of_x, x0)
        x_star = x0 - torch.linalg.solve(hess, grad)
        log_int = -u_of_x(x_star) + 15 * math.log(2 * math.pi) - 0.5 * torch.logdet(hess)
        prior = torch.distributions.Normal(torch.tensor(0.0, dtype=D64), 2.0).log_prob(ui).sum()
        assert float(log_int) == pytest.approx(float(brownian_log_lik(ui[:1], ui[1:])[0] + prior), abs=1e-9)


@pytest.mark.skipif(not REFERENCES.exists(), reason="benchmarks/references.json not computed yet")
def test_references_json():
    doc = json.loads(REFERENCES.read_text())["targets"]
    for name in BAYESIAN_TARGETS:
        entry = doc[name]
        assert np.isfinite(entry["log_z"])
        assert 0 < entry["se"] < 0.05
        assert entry["agreement"]["all_within_3_se"]
        dim = get_target(name).dim
        assert len(entry["posterior_mean"]) == len(entry["posterior_sd"]) == len(entry["labels"]) == dim
        assert all(s > 0 for s in entry["posterior_sd"])


def test_mixture_model_evidence_by_enumeration_matches_quadrature():
    t = get_target("mixture_model_k2")
    grid = torch.linspace(-15.0, 15.0, 1201, dtype=D64)
    points = torch.cartesian_prod(grid, grid)
    quadrature = float(torch.logsumexp(-t.potential(points), 0)) + 2 * math.log(float(grid[1] - grid[0]))
    assert t.log_z == pytest.approx(quadrature, abs=1e-8)
    # the label switching: the potential is invariant under swapping the two locations
    x = torch.randn(5, 2, dtype=D64)
    torch.testing.assert_close(t.potential(x), t.potential(x.flip(-1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("model", ["mixture", "hmm"])
def test_the_enumeration_benchmark_writes_one_model_twice(model):
    # benchmarks.enumeration compares a model with enumerated sites to the same model summed out by hand: the two
    # must have one potential (Pyro's enumeration of a pyro.markov chain against the forward algorithm)
    from benchmarks.enumeration import MODELS
    from pyro_osds.model import ModelTarget

    data, with_enumeration, by_hand = MODELS[model]
    y = data(30, 0)
    enumerated = ModelTarget(with_enumeration, (y,), max_plate_nesting=1)
    marginalised = ModelTarget(by_hand, (y,), max_plate_nesting=1)
    assert [s.name for s in enumerated.sites] == [s.name for s in marginalised.sites]
    z = enumerated.init + torch.randn(6, enumerated.dim, dtype=D64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(enumerated.potential(z), marginalised.potential(z), rtol=1e-10, atol=1e-9)
