# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Conditionally Gaussian sites drawn whitened (pyro_osds.whitening): which sites, the exact change of variables, the
choice, the report, save / load, and the evidence against an exact answer; the Laplace form of random effects under a
binomial likelihood likewise."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS
from pyro_osds import checkpoint as ckpt
from pyro_osds.model import build_target
from pyro_osds.ops.conditional import unwhiten
from pyro_osds.reparam import NoncenteringConfig
from pyro_osds.whitening import NEWTON_STEPS, WhitenedTarget, conditionally_gaussian_sites, log_concave_sites

D64 = torch.float64
Y = torch.tensor([1.5, -0.4, 2.2, 0.7], dtype=D64)
SIGMA = torch.tensor([1.0, 0.7, 1.5, 1.2], dtype=D64)
MU_SD, TAU_SD = 3.0, 2.0


def schools(sigma, y):
    """Centred random effects with a Normal likelihood: quadratic in (mu, theta) given tau."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), MU_SD))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(TAU_SD, dtype=D64)))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def schools_exact(num_points=40001):
    """Exact log Z and posterior mean of mu: y | tau ~ N(0, MU_SD^2 11^T + diag(sigma^2 + tau^2)) and
    mu | tau, y Gaussian, integrated over u = log tau."""
    u = torch.linspace(-14.0, 5.0, num_points, dtype=D64)
    tau = u.exp()
    cov = MU_SD**2 * torch.ones(4, 4, dtype=D64) + torch.diag_embed(SIGMA**2 + tau[:, None] ** 2)
    log_lik = dist.MultivariateNormal(torch.zeros(4, dtype=D64), covariance_matrix=cov).log_prob(Y)
    log_prior = dist.HalfNormal(torch.tensor(TAU_SD, dtype=D64)).log_prob(tau) + u
    log_f = log_lik + log_prior
    top = log_f.max()
    mass = torch.trapezoid((log_f - top).exp(), u)
    precision = 1.0 / MU_SD**2 + (1.0 / (SIGMA**2 + tau[:, None] ** 2)).sum(-1)
    mu_mean = (Y / (SIGMA**2 + tau[:, None] ** 2)).sum(-1) / precision
    return float(top + torch.log(mass)), float(torch.trapezoid((log_f - top).exp() * mu_mean, u) / mass)


def logistic(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
    pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def test_the_sites_in_which_the_potential_is_quadratic_are_found():
    target, _, _ = build_target(schools, args=(SIGMA, Y))
    assert conditionally_gaussian_sites(target) == ("mu", "theta")
    assert conditionally_gaussian_sites(target, exclude=("mu",)) == ("theta",)
    # theta alone: four effects independent given mu and tau (groups of one); with mu, five coupled coordinates
    assert conditionally_gaussian_sites(target, max_dim=3) == ("theta",)
    assert conditionally_gaussian_sites(target, max_dim=3, exclude=("theta",)) == ("mu",)
    x = torch.randn(6, 2, dtype=D64, generator=torch.Generator().manual_seed(0))
    plain, _, _ = build_target(logistic, args=(x, (x.sum(-1) > 0).to(D64)))
    assert conditionally_gaussian_sites(plain) == ()


def test_the_whitened_target_is_the_exact_change_of_variables_and_reports_the_model_sites():
    target, _, _ = build_target(schools, args=(SIGMA, Y))
    white = WhitenedTarget(target, ("mu", "theta"))
    z = white.init + 0.5 * torch.randn(7, white.dim, dtype=D64, generator=torch.Generator().manual_seed(1))
    base = white.to_base(z)
    torch.testing.assert_close(white.from_base(base), z, rtol=0, atol=1e-10)
    # U'(z) = U(x(z)) - log|det dx/dz| (the map's Jacobian by autograd)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: unwhiten(target.potential, v[None], white.block)[0][0], z[i])
        expected = target.potential(base[i:i + 1]) - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(white.potential(z[i:i + 1]), expected, rtol=1e-10, atol=1e-10)
    values = white.constrain(z)
    assert set(values) == {"mu", "tau", "theta"} and values["theta"].shape == (7, 4)
    torch.testing.assert_close(values["mu"], base[:, [s.name for s in target.sites].index("mu")])
    assert (values["tau"] > 0).all()
    torch.testing.assert_close(white.unconstrain(values), z, rtol=0, atol=1e-10)
    torch.testing.assert_close(white.pack(white.unpack(z)), z, rtol=0, atol=1e-10)
    torch.testing.assert_close(white.to_base(z[0]), base[0])
    assert set(white.log_likelihood(z)) == {"y"}


def test_the_choice_whitens_a_hierarchy_and_the_evidence_is_exact():
    """Statistical: centred random effects with a Normal likelihood (exact log Z by quadrature); whitened given tau
    (after non-centring theta: ``mu`` and ``theta_decentered``), what is left is the one-dimensional marginal of tau.
    Tolerance: 4 SE + 0.005."""
    pyro.set_rng_seed(0)
    osds = OSDS(schools, num_samples=2000, disable_progbar=True).run(SIGMA, Y)
    assert "mu" in osds.target.whitened_sites and len(osds.target.whitened_sites) == 2
    ev = osds.log_evidence()
    truth, mu_mean = schools_exact()
    assert ev.reliable and ev.ess_per_draw > 0.9, ev
    assert abs(ev.log_z - truth) < 4 * ev.se + 0.005, (ev.log_z, truth, ev.se)
    samples = osds.get_samples()
    assert {"mu", "tau", "theta"} <= set(samples) and samples["theta"].shape == (4000, 4)
    mean, sd = float(samples["mu"].mean()), float(samples["mu"].std())  # resampled by the weights
    assert abs(mean - mu_mean) < 4 * sd * math.sqrt(1 / ev.ess + 1 / 4000), (mean, mu_mean)


GROUPS = 80  # more than whitening_max_dim (64) coordinates


def many_groups(sigma, y):
    """A hierarchy of 80 groups: centred effects with a Normal likelihood under a half-Cauchy scale."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(1.0, dtype=D64)))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


@pytest.mark.slow
def test_a_plate_of_effects_beyond_the_dense_limit_is_whitened_group_by_group():
    """Statistical: the 80 effects are independent given mu and tau (a diagonal curvature), so they are whitened as
    80 groups of one, beyond the 64 coordinates a dense block may couple; log Z against the exact value (quadrature
    over tau, mu integrated in closed form). Tolerance: 4 SE + 0.005."""
    from benchmarks.scaling import hierarchical_log_z

    gen = torch.Generator().manual_seed(3)
    sigma = 0.5 + torch.rand(GROUPS, dtype=D64, generator=gen)
    y = (1.0 + 0.8 * torch.randn(GROUPS, dtype=D64, generator=gen)
         + sigma * torch.randn(GROUPS, dtype=D64, generator=gen))
    pyro.set_rng_seed(0)
    osds = OSDS(many_groups, num_samples=2000, num_chains=1, disable_progbar=True).run(sigma, y)
    block = osds.target.block
    assert block.groups == GROUPS and block.group_size == 1, osds.target.whitened_sites
    ev = osds.log_evidence()
    truth = hierarchical_log_z(y, sigma, loc_sd=5.0, tau_prior=dist.HalfCauchy(torch.tensor(1.0, dtype=D64)))
    assert ev.reliable and ev.ess_per_draw > 0.9, ev
    assert abs(ev.log_z - truth) < 4 * ev.se + 0.005, (ev.log_z, truth, ev.se)


SLOPE_GROUPS, SLOPE_ROWS, SLOPE_NOISE = 40, 5, 0.8


def intercepts_and_slopes(x, y):
    """Random intercepts and slopes per group under learned scales, a Normal likelihood with known noise: given the
    scales, each group's (a_j, b_j) is a Gaussian pair coupled by its own rows, independent of the other groups."""
    tau_a = pyro.sample("tau_a", dist.HalfNormal(torch.tensor(1.0, dtype=D64)))
    tau_b = pyro.sample("tau_b", dist.HalfNormal(torch.tensor(1.0, dtype=D64)))
    with pyro.plate("groups", x.shape[0]):
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=D64), tau_a))
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=D64), tau_b))
        pyro.sample("y", dist.Normal(a.unsqueeze(-1) + b.unsqueeze(-1) * x, SLOPE_NOISE).to_event(1), obs=y)


def intercepts_and_slopes_log_z(x, y, num_points=401):
    """Exact log Z: y_j | tau ~ N(0, tau_a^2 11^T + tau_b^2 x_j x_j^T + noise^2 I), trapezoids over (log tau_a,
    log tau_b)."""
    u = torch.linspace(-7.0, 2.0, num_points, dtype=D64)
    ua, ub = torch.meshgrid(u, u, indexing="ij")
    ta, tb = ua.exp().reshape(-1, 1, 1), ub.exp().reshape(-1, 1, 1)
    log_f = torch.zeros(ta.shape[0], dtype=D64)
    ones = torch.ones(SLOPE_ROWS, dtype=D64)
    for xj, yj in zip(x, y, strict=True):
        cov = ta**2 * ones.outer(ones) + tb**2 * xj.outer(xj) + SLOPE_NOISE**2 * torch.eye(SLOPE_ROWS, dtype=D64)
        log_f += dist.MultivariateNormal(torch.zeros(SLOPE_ROWS, dtype=D64), covariance_matrix=cov).log_prob(yj)
    prior = dist.HalfNormal(torch.tensor(1.0, dtype=D64))
    log_f += prior.log_prob(ta.reshape(-1)) + prior.log_prob(tb.reshape(-1)) + ua.reshape(-1) + ub.reshape(-1)
    f = log_f.reshape(num_points, num_points)
    step, top = float(u[1] - u[0]), f.max()
    return float(top + torch.log(torch.trapezoid(torch.trapezoid((f - top).exp(), dx=step, dim=1), dx=step)))


@pytest.mark.slow
def test_intercepts_and_slopes_are_whitened_as_pairs_and_the_evidence_is_exact():
    """Statistical: 40 groups of an intercept and a slope (80 coordinates, more than a dense block may couple) are
    whitened as 40 pairs given the scales (the two sites' coordinates interleaved into groups); log Z against the
    exact value. Tolerance: 4 SE + 0.005."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(SLOPE_GROUPS, SLOPE_ROWS, dtype=D64, generator=gen)
    y = (0.7 * torch.randn(SLOPE_GROUPS, 1, dtype=D64, generator=gen)
         + 0.4 * torch.randn(SLOPE_GROUPS, 1, dtype=D64, generator=gen) * x
         + SLOPE_NOISE * torch.randn(SLOPE_GROUPS, SLOPE_ROWS, dtype=D64, generator=gen))
    pyro.set_rng_seed(0)
    osds = OSDS(intercepts_and_slopes, num_samples=2000, num_chains=1, disable_progbar=True).run(x, y)
    block = osds.target.block
    assert block.groups == SLOPE_GROUPS and block.group_size == 2, osds.target.whitened_sites
    ev = osds.log_evidence()
    truth = intercepts_and_slopes_log_z(x, y)
    assert ev.reliable and ev.ess_per_draw > 0.9, ev
    assert abs(ev.log_z - truth) < 4 * ev.se + 0.005, (ev.log_z, truth, ev.se)
    samples = osds.get_samples()
    assert samples["a"].shape == samples["b"].shape == (2000, SLOPE_GROUPS)


def test_whitening_is_saved_with_the_run_and_reused_on_loading(tmp_path):
    pyro.set_rng_seed(0)
    osds = OSDS(schools, preset="smoke", num_samples=50, noncentering="none", whitening=("theta",),
                disable_progbar=True).run(SIGMA, Y)
    assert osds.target.whitened_sites == ("theta",) and isinstance(osds.target, WhitenedTarget)
    path = tmp_path / "schools.pt"
    osds.save(path)
    pyro.set_rng_seed(123)  # another global random state: the map must not depend on it (nor on the initial point)
    loaded = OSDS.load(path, schools, model_args=(SIGMA, Y))
    assert loaded.target.whitened_sites == ("theta",)
    assert torch.equal(loaded.target.block.x_ref, osds.target.block.x_ref)
    assert torch.equal(loaded.target.block.pattern, osds.target.block.pattern)
    assert math.isclose(loaded.log_evidence().log_z, osds.log_evidence().log_z, rel_tol=1e-12)
    assert torch.equal(loaded.get_samples()["theta"], osds.get_samples()["theta"])
    # a checkpoint whose block was mapped in another form (another version, another model) is refused
    state = ckpt.read(path)
    assert state["whitening_form"] == "quadratic"
    ckpt.atomic_save({**state, "whitening_form": "laplace"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="drawn in the laplace form, this model's in the quadratic form"):
        OSDS.load(tmp_path / "other.pt", schools, model_args=(SIGMA, Y))
    ckpt.atomic_save({k: v for k, v in state.items() if k != "whitening_form"}, tmp_path / "older.pt")
    assert OSDS.load(tmp_path / "older.pt", schools, model_args=(SIGMA, Y)).target.whitened_sites == ("theta",)
    # resuming with another choice would read the saved draws through another map: refused, naming the fix
    with pytest.raises(ValueError, match="whitening=\\('theta',\\)"):
        OSDS(schools, preset="smoke", num_samples=50, noncentering="none", whitening="none", checkpoint=path,
             resume=True, disable_progbar=True).fit(SIGMA, Y)


def test_whitening_none_keeps_the_model_as_written_and_bad_names_are_refused():
    target, _, _ = build_target(schools, args=(SIGMA, Y), noncentering=NoncenteringConfig("none", whitening="none"))
    assert not isinstance(target, WhitenedTarget) and target.whitened_sites == ()
    with pytest.raises(ValueError, match="`whitening` names \\['nope'\\]"):
        build_target(schools, args=(SIGMA, Y), noncentering=NoncenteringConfig("none", whitening=("nope",)))
    with pytest.raises(ValueError, match="whitening"):
        NoncenteringConfig(whitening="always")
    with pytest.raises(ValueError, match="given in `initial_params`"):
        build_target(schools, args=(SIGMA, Y), initial_params={"mu": torch.tensor(0.0, dtype=D64),
                     "tau": torch.tensor(0.0, dtype=D64), "theta": torch.zeros(4, dtype=D64)},
                     noncentering=NoncenteringConfig("none", whitening=("theta",)))


TRIALS = torch.tensor([12.0, 9.0, 15.0, 10.0, 14.0, 8.0], dtype=D64)
SUCCESSES = torch.tensor([9.0, 2.0, 13.0, 6.0, 3.0, 8.0], dtype=D64)
OFFSET_SD, SCALE_SD = 1.0, 1.5


def binomial_effects(trials, successes):
    """Centred random effects under a binomial likelihood: log-concave, not quadratic, in (a, b) given tau."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=D64), OFFSET_SD))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(SCALE_SD, dtype=D64)))
    with pyro.plate("groups", trials.shape[0]):
        b = pyro.sample("b", dist.Normal(a, tau))
        pyro.sample("y", dist.Binomial(trials, logits=b), obs=successes)


def binomial_effects_log_z(num_u=241, num_a=121, num_e=241):
    """Exact log Z by quadrature: each group's effect b = a + tau e on a grid of e (smooth whatever tau), then the
    offset a and u = log tau on grids."""
    u = torch.linspace(-9.0, 3.0, num_u, dtype=D64)
    a = torch.linspace(-5.0, 5.0, num_a, dtype=D64)
    e = torch.linspace(-8.0, 8.0, num_e, dtype=D64)
    b = a[None, :, None] + u.exp()[:, None, None] * e  # (u, a, e)
    log_normal = dist.Normal(torch.tensor(0.0, dtype=D64), 1.0).log_prob(e)
    total = torch.zeros(num_u, num_a, dtype=D64)
    log_choose = torch.lgamma(TRIALS + 1) - torch.lgamma(SUCCESSES + 1) - torch.lgamma(TRIALS - SUCCESSES + 1)
    for g in range(TRIALS.shape[0]):
        f = SUCCESSES[g] * b - TRIALS[g] * torch.nn.functional.softplus(b) + log_choose[g] + log_normal
        top = f.amax(-1, keepdim=True)
        total = total + top.squeeze(-1) + torch.log(torch.trapezoid((f - top).exp(), e, dim=-1))
    total = total + dist.Normal(torch.tensor(0.0, dtype=D64), OFFSET_SD).log_prob(a)
    total = total + (dist.HalfNormal(torch.tensor(SCALE_SD, dtype=D64)).log_prob(u.exp()) + u)[:, None]
    top = total.max()
    inner = torch.trapezoid((total - top).exp(), a, dim=-1)
    return float(top + torch.log(torch.trapezoid(inner, u)))


def test_random_effects_under_a_binomial_likelihood_are_found_in_their_laplace_form():
    target, _, _ = build_target(binomial_effects, args=(TRIALS, SUCCESSES))
    assert conditionally_gaussian_sites(target) == ("a",)  # the offset given the effects; the effects are not
    assert log_concave_sites(target) == ("b",)  # the effects; the scalars stay outside the block
    assert log_concave_sites(target, ("a",)) == ("a", "b")  # with the quadratic sites it starts from
    assert log_concave_sites(target, exclude=("b",)) == ()
    white = WhitenedTarget(target, ("a", "b"))  # named: a and its effects, an arrow read in two colours
    assert white.block.newton_steps == NEWTON_STEPS and white.block.num_colours == 2
    z = white.init + 0.5 * torch.randn(5, white.dim, dtype=D64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(white.from_base(white.to_base(z)), z, rtol=0, atol=1e-9)
    quadratic = WhitenedTarget(build_target(schools, args=(SIGMA, Y))[0], ("mu", "theta"))
    assert quadratic.block.newton_steps == 1 and quadratic.last_evaluations is None


@pytest.mark.slow
def test_the_laplace_form_of_binomial_random_effects_gives_the_exact_evidence():
    """Statistical: centred random effects under a binomial likelihood (exact log Z by quadrature), whitening='laplace':
    the effects (non-centred or not, as the choice finds) drawn in their Laplace form given the rest. Tolerance:
    4 SE + 0.005; the draws' cost is counted call by call."""
    pyro.set_rng_seed(0)
    osds = OSDS(binomial_effects, num_samples=2000, num_chains=1, whitening="laplace",
                disable_progbar=True).run(TRIALS, SUCCESSES)
    assert isinstance(osds.target, WhitenedTarget) and osds.target.block.newton_steps > 1
    assert "b" in osds.target.whitened_sites or "b_decentered" in osds.target.whitened_sites
    ev = osds.log_evidence()
    truth = binomial_effects_log_z()
    assert ev.reliable and ev.ess_per_draw > 0.5, ev
    assert abs(ev.log_z - truth) < 4 * ev.se + 0.005, (ev.log_z, truth, ev.se)
    samples = osds.get_samples()
    assert samples["b"].shape == (2000, 6) and (samples["tau"] > 0).all()
    rows = ev.cost.drawing.potential_evaluations
    assert 2000 * 4 <= rows <= 2000 * osds.target.evaluations_per_row, rows  # at least two readings each
