# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.model: the Pyro model adapter, constrained sites, enumeration, conjugate models' evidence."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.indexing import Vindex

from pyro_osds import OSDS, UnsupportedModelError
from pyro_osds.model import ModelTarget
from tests.common import D64, Z


def close_to_truth(estimate, truth, se):
    """|estimate - truth| within z standard errors plus the log-mean-exp bias (about se^2 / 2)."""
    return abs(estimate - truth) <= Z * se + 0.5 * se**2 + 1e-9


# ------------------------------------------------------------------------------------------------
# models
def linear_regression(X, y=None, sigma=0.5, prior_scale=1.0):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), prior_scale).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Normal(X @ w, sigma), obs=y)


def linear_regression_truth(X, y, sigma=0.5, prior_scale=1.0):
    n, p = X.shape
    cov_y = prior_scale**2 * X @ X.T + sigma**2 * torch.eye(n, dtype=X.dtype)
    log_z = float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=X.dtype), cov_y).log_prob(y))
    post_cov = torch.linalg.inv(X.T @ X / sigma**2 + torch.eye(p, dtype=X.dtype) / prior_scale**2)
    post_mean = post_cov @ X.T @ y / sigma**2
    return log_z, post_mean, post_cov.diagonal().sqrt()


def beta_bernoulli(y, a=2.0, b=3.0):
    p = pyro.sample("p", dist.Beta(torch.tensor(a, dtype=y.dtype), torch.tensor(b, dtype=y.dtype)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Bernoulli(p), obs=y)


def constrained_model(y, broadcast_safe=True):
    scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(2.0, dtype=y.dtype)))
    probs = pyro.sample("probs", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
    corr = pyro.sample("corr", dist.LKJCholesky(3, torch.tensor(2.0, dtype=y.dtype)))
    loc = (probs - 1 / 3) * 3
    # `scale * corr` is right for one draw but misaligns a batch of particles against the matrix dims
    cov_tril = scale[..., None, None] * corr if broadcast_safe else scale * corr
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.MultivariateNormal(loc, scale_tril=cov_tril), obs=y)


def mixture(data):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=data.dtype)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=data.dtype), 5.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., z], 1.0), obs=data)


@pytest.fixture
def regression_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, dtype=D64, generator=g)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=D64) + 0.5 * torch.randn(40, dtype=D64, generator=g)
    return X, y


# ------------------------------------------------------------------------------------------------
# adapter
def test_pack_unpack_round_trip_and_site_order():
    y = torch.randn(10, 3, dtype=D64)
    target = ModelTarget(constrained_model, (y,))
    assert [s.name for s in target.sites] == ["corr", "probs", "scale"]  # Pyro's sorted order
    assert target.dim == 3 + 2 + 1  # LKJ(3): 3 free parameters, Dirichlet(3): 2, scale: 1
    z = torch.randn(5, target.dim, dtype=D64)
    torch.testing.assert_close(target.pack(target.unpack(z)), z, rtol=0, atol=0)
    torch.testing.assert_close(target.unconstrain(target.constrain(z)), z, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="Missing latent sites"):
        target.pack({"scale": torch.zeros(5, 1)})
    with pytest.raises(ValueError, match="must have shape"):
        target.pack({k: torch.zeros(5, 7) for k in ("corr", "probs", "scale")})


@pytest.mark.parametrize("method", ["vmap", "plate", "loop"])
def test_constrained_potential_matches_pyro(method):
    g = torch.Generator().manual_seed(2)
    y = torch.randn(12, 3, dtype=D64, generator=g)
    target = ModelTarget(constrained_model, (y,), vectorize=method)
    assert target.vectorize == method
    z = target.init + 0.5 * torch.randn(6, target.dim, dtype=D64, generator=g)
    torch.testing.assert_close(target.potential(z), target.pyro_potential(z), rtol=1e-10, atol=1e-10)


def test_verification_catches_a_model_that_broadcasts_wrongly():
    y = torch.randn(12, 3, dtype=D64)
    with pytest.raises(ValueError, match="`vectorize='plate'` does not work for this model: disagrees"):
        ModelTarget(constrained_model, (y, False), vectorize="plate")
    assert ModelTarget(constrained_model, (y, False)).vectorize == "vmap"  # vmap is immune to this


def test_vmap_is_chosen_for_matmul_models(regression_data):
    assert ModelTarget(linear_regression, regression_data).vectorize == "vmap"


def test_enumerated_mixture_uses_the_plate_and_matches_pyro():
    data = torch.cat([torch.randn(15, dtype=D64) - 3, torch.randn(10, dtype=D64) + 3])
    target = ModelTarget(mixture, (data,), max_plate_nesting=1)
    assert target.vectorize == "plate" and target.enumerated_sites == ["z"]
    z = target.init + 0.3 * torch.randn(5, target.dim, dtype=D64)
    torch.testing.assert_close(target.potential(z), target.pyro_potential(z), rtol=1e-10, atol=1e-10)


def test_unvectorisable_model_falls_back_to_a_loop_with_a_warning():
    def branching(y):
        s = pyro.sample("s", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
        loc = s if s > 0 else -s  # Python control flow on a latent value
        pyro.sample("obs", dist.Normal(loc, 1.0).expand(y.shape).to_event(1), obs=y)

    with pytest.warns(UserWarning, match="could not be vectorised"):
        target = ModelTarget(branching, (torch.ones(3, dtype=D64),))
    assert target.vectorize == "loop"


def test_non_enumerable_discrete_site_is_refused():
    def poisson_latent(y):
        k = pyro.sample("k", dist.Poisson(torch.tensor(3.0)))
        pyro.sample("obs", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(UnsupportedModelError, match="Latent site 'k' is discrete with infinite support"):
        OSDS(poisson_latent).run(torch.tensor(1.0))


def test_subsample_plates_are_refused():
    def subsampled(y):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0], subsample_size=2) as idx:
            pyro.sample("obs", dist.Normal(m, 1.0), obs=y[idx])

    with pytest.raises(UnsupportedModelError, match=r"subsampling: plate 'data' \(at site 'obs'\) uses 2 of 10"):
        OSDS(subsampled).run(torch.randn(10))


def test_model_without_continuous_latents_has_its_exact_evidence():  # more in tests/test_exact.py
    def observed_only(y):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=y)

    ev = OSDS(observed_only, num_samples=10, disable_progbar=True).run(torch.tensor(0.5)).log_evidence()
    assert ev.log_z == pytest.approx(float(dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5)))) and ev.se == 0


def test_model_with_infinite_potential_everywhere_is_refused():
    def broken(y):
        m = pyro.sample("m", dist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.tensor(-math.inf) + 0 * m)
        pyro.sample("obs", dist.Normal(m, 1.0), obs=y)

    with pytest.raises(ValueError, match="NaN or infinite at every initial point"):
        OSDS(broken).run(torch.tensor(0.5))


@pytest.mark.parametrize(
    "initial_params, error, match",
    [
        ({"w": torch.zeros(3, dtype=D64)}, ValueError, "must give every latent site"),
        ({"w": torch.zeros(3, dtype=D64), "s": torch.zeros(()), "x": torch.zeros(1)}, ValueError, "unknown"),
        ({"w": torch.zeros(4, dtype=D64), "s": torch.zeros((), dtype=D64)}, ValueError, "unconstrained shape"),
        ({"w": torch.zeros(3, dtype=torch.long), "s": torch.zeros((), dtype=D64)}, TypeError, "floating point"),
        ({"w": torch.zeros(3, dtype=D64), "s": torch.tensor(math.inf, dtype=D64)}, ValueError, "not finite"),
        ([0.0, 1.0], TypeError, "must be a dict"),
    ],
)
def test_bad_initial_params_for_models(regression_data, initial_params, error, match):
    def model(X, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=D64), 1.0).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=D64)))
        pyro.sample("obs", dist.Normal(X @ w, s).to_event(1), obs=y)

    with pytest.raises(error, match=match):
        OSDS(model, initial_params=initial_params, preset="smoke").run(*regression_data)


def test_initial_params_for_models_set_the_starting_point(regression_data):
    start = {"w": torch.tensor([0.5, -1.0, 0.25], dtype=D64)}
    target = ModelTarget(linear_regression, regression_data, initial_params=start)
    torch.testing.assert_close(target.init, start["w"])


def vague_random_effects(y):
    # a vague Gamma(0.01, 0.01) precision: its prior medians are ~1e-30, so init_to_median puts b at ~1e8
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(0.01, dtype=y.dtype), 0.01))
    with pyro.plate("groups", y.shape[0]):
        b = pyro.sample("b", dist.Normal(torch.tensor(0.0, dtype=y.dtype), tau.rsqrt()))
        pyro.sample("y", dist.Normal(b, 1.0), obs=y)


VAGUE_Y = torch.tensor([1.2, -0.4, 2.1, 0.3, -1.5, 0.9, 1.8, -0.2], dtype=D64)


def test_the_default_initial_point_survives_a_vague_scale_prior():
    from pyro.infer.autoguide.initialization import init_to_median

    pyro.set_rng_seed(0)
    median = ModelTarget(vague_random_effects, (VAGUE_Y,), init_strategy=init_to_median(num_samples=15))
    default = ModelTarget(vague_random_effects, (VAGUE_Y,))
    assert float(median.potential(median.init[None])) > 1e6  # the medians are useless here
    assert float(default.potential(default.init[None])) < 100 and bool((default.init.abs() <= 2).all())
    # an explicit strategy or initial point is used as given
    assert torch.equal(ModelTarget(vague_random_effects, (VAGUE_Y,), initial_params={
        "tau": torch.tensor(0.5, dtype=D64), "b": torch.zeros(8, dtype=D64)}).init[-1], torch.tensor(0.5, dtype=D64))


def test_a_vague_scale_prior_gets_exact_evidence():
    # y_j | tau ~ N(0, 1 + 1/tau): log Z by quadrature over log tau (the Pyro model diverged before)
    u = torch.linspace(-40.0, 25.0, 200001, dtype=D64)
    log_prior = dist.Gamma(torch.tensor(0.01, dtype=D64), 0.01).log_prob(u.exp()) + u
    log_lik = dist.Normal(0.0, (1 + (-u).exp()).sqrt().unsqueeze(-1)).log_prob(VAGUE_Y).sum(-1)
    log_z = float(torch.logsumexp(log_prior + log_lik, 0) + math.log(float(u[1] - u[0])))
    pyro.set_rng_seed(0)
    ev = OSDS(vague_random_effects, num_chains=1, num_samples=4000, disable_progbar=True).run(VAGUE_Y).log_evidence()
    assert close_to_truth(ev.log_z, log_z, ev.se), (ev, log_z)


def test_pointwise_log_likelihood(regression_data):
    X, y = regression_data
    target = ModelTarget(linear_regression, (X, y))
    z = torch.randn(4, target.dim, dtype=D64)
    ll = target.log_likelihood(z)
    assert set(ll) == {"obs"} and ll["obs"].shape == (4, 40)
    expected = torch.distributions.Normal(z @ X.T, 0.5).log_prob(y)
    torch.testing.assert_close(ll["obs"], expected)


# ------------------------------------------------------------------------------------------------
# end to end, against exact answers
def test_linear_regression_evidence_and_posterior(regression_data):
    X, y = regression_data
    log_z, post_mean, post_sd = linear_regression_truth(X, y)
    osds = OSDS(linear_regression, num_samples=2000, preset="smoke").run(X, y)
    ev = osds.log_evidence()
    assert ev.k_hat < 0.7
    assert close_to_truth(ev.log_z, log_z, ev.se), (ev, log_z)
    assert ev.elbo <= log_z + Z * ev.elbo_se
    stats = osds.summary_dict()["w"]
    assert bool(((stats["mean"] - post_mean).abs() <= Z * post_sd / math.sqrt(ev.ess)).all())
    assert bool(((stats["std"] / post_sd - 1).abs() <= Z / math.sqrt(2 * ev.ess) + 0.01).all())


def test_beta_bernoulli_evidence_in_unconstrained_space():
    y = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=D64)
    a, b, k, n = 2.0, 3.0, float(y.sum()), y.numel()
    log_z = math.lgamma(a + k) + math.lgamma(b + n - k) - math.lgamma(a + b + n) - (
        math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    osds = OSDS(beta_bernoulli, num_samples=2000, preset="smoke").run(y)
    ev = osds.log_evidence()
    # No k-hat < 0.7 requirement here: in logit space the Beta posterior has exponential tails, heavier
    # than the sampler's Gaussian ones, so E_q[w^2] diverges in the far tail and PSIS rightly says so;
    # that tail holds negligible mass and the estimate is accurate.
    assert close_to_truth(ev.log_z, log_z, ev.se), (ev, log_z)
    p = osds.get_samples()["p"]
    assert bool(((p > 0) & (p < 1)).all())
    post_mean, post_sd = (a + k) / (a + b + n), math.sqrt((a + k) * (b + n - k) / ((a + b + n) ** 2 * (a + b + n + 1)))
    mean = float(osds.summary_dict()["p"]["mean"])
    assert abs(mean - post_mean) <= Z * post_sd / math.sqrt(ev.ess)


def test_constrained_draws_respect_their_supports():
    y = torch.randn(12, 3, dtype=D64)
    osds = OSDS(constrained_model, num_samples=200, preset="smoke", num_chains=1).run(y)
    s = osds.get_samples()
    assert bool((s["scale"] > 0).all())
    assert bool((s["probs"] > 0).all()) and torch.allclose(s["probs"].sum(-1), torch.ones(200, dtype=D64))
    corr = s["corr"] @ s["corr"].transpose(-1, -2)
    torch.testing.assert_close(corr.diagonal(dim1=-2, dim2=-1), torch.ones(200, 3, dtype=D64))


def test_enumerated_mixture_end_to_end_recovers_discrete_draws():
    g = torch.Generator().manual_seed(3)
    data = torch.cat([torch.randn(12, dtype=D64, generator=g) - 3, torch.randn(8, dtype=D64, generator=g) + 3])
    osds = OSDS(mixture, num_samples=50, preset="smoke", num_chains=1, max_plate_nesting=1).run(data)
    s = osds.get_samples()
    assert s["z"].shape == (50, 20) and set(s["z"].unique().tolist()) <= {0, 1}
    # the assignments follow the data: the two groups get different labels in (almost) every draw
    locs = s["locs"]
    left = torch.where(locs[:, 0] < locs[:, 1], 0, 1)
    agree = (s["z"][:, :12] == left[:, None]).double().mean()
    assert float(agree) > 0.9
    assert math.isfinite(osds.log_evidence().log_z)


def test_a_linear_regression_in_200_dimensions_gets_exact_evidence():
    # above the 128 dimensions where the evidence used to switch silently to Hutchinson (log Z = +154 for
    # binary data): the one-step map's exact log-det is a diagonal plus a low-rank product at any dimension
    g = torch.Generator().manual_seed(5)
    X = torch.randn(260, 200, dtype=D64, generator=g) / math.sqrt(200)
    y = X @ torch.randn(200, dtype=D64, generator=g) + 0.5 * torch.randn(260, dtype=D64, generator=g)
    log_z, post_mean, post_sd = linear_regression_truth(X, y)
    osds = OSDS(linear_regression, num_chains=1, num_samples=2000, preset="smoke").run(X, y)
    ev = osds.log_evidence()
    assert ev.log_det == "exact" and ev.exact and ev.reliable, ev
    assert close_to_truth(ev.log_z, log_z, ev.se), (ev, log_z)
    assert ev.elbo <= log_z + Z * ev.elbo_se


def test_a_dense_gaussian_prior_is_vectorised_by_a_plate_not_vmap():
    # vmap over MultivariateNormal.log_prob copies the 400 x 400 Cholesky factor for every particle (at 1600-D:
    # 32 GB for a Hessian, 6 s per training batch); a plate broadcasts one. Both are exact: the faster one wins.
    dim = 400
    grid = torch.arange(dim, dtype=D64)[:, None]
    scale_tril = torch.linalg.cholesky(torch.exp(-torch.cdist(grid, grid) / 10))
    y = torch.randn(dim, dtype=D64, generator=torch.Generator().manual_seed(0))

    def gp(y):
        f = pyro.sample("f", dist.MultivariateNormal(torch.zeros(dim, dtype=D64), scale_tril=scale_tril))
        pyro.sample("y", dist.Normal(f, 1.0).to_event(1), obs=y)

    target = ModelTarget(gp, (y,))
    assert target.vectorize == "plate"
    z = target.probe_points()
    torch.testing.assert_close(target.potential(z), target._potentials["vmap"](z))
    assert target._seconds("vmap", z) > target.FASTER_BY * target._seconds("plate", z)
    # `vectorize=` still forces a method
    assert ModelTarget(gp, (y,), vectorize="vmap").vectorize == "vmap"


# ------------------------------------------------------------------------------------------------
# draws of enumerated sites: a pyro.markov chain and a plate, against their exact conditionals
def hmm(y):
    trans = pyro.sample("trans", dist.Dirichlet(torch.ones(2, 2, dtype=D64)).to_event(1))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=D64), 5.0).to_event(1))
    x = 0
    for t in pyro.markov(range(len(y))):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(trans)[..., x, :]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], 1.0), obs=y[t])


def hmm_posterior(trans, locs, y):
    """Exact ``P(x_t | y)`` ``(T, 2)`` and ``P(x_t = x_{t+1} | y)`` ``(T - 1,)`` by the forward-backward algorithm."""
    lik = dist.Normal(locs, 1.0).log_prob(y[:, None]).exp()  # (T, 2)
    fwd = [trans[0] * lik[0]]
    for t in range(1, len(y)):
        fwd.append((fwd[-1] @ trans) * lik[t])
    bwd = [torch.ones(2, dtype=D64)]
    for t in range(len(y) - 1, 0, -1):
        bwd.insert(0, trans @ (lik[t] * bwd[0]))
    z = fwd[-1].sum()
    marginals = torch.stack([f * b for f, b in zip(fwd, bwd, strict=True)]) / z
    pairs = torch.stack([(fwd[t][:, None] * trans * (lik[t + 1] * bwd[t + 1])[None, :]).diagonal().sum() / z
                         for t in range(len(y) - 1)])
    return marginals, pairs


def test_enumerated_sites_are_drawn_from_their_exact_conditional_along_a_markov_chain():
    y = torch.tensor([-1.0, 0.2, 1.5, 0.1, -0.4, 2.0], dtype=D64)
    target = ModelTarget(hmm, (y,))
    trans = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=D64)
    locs = torch.tensor([-1.0, 1.0], dtype=D64)
    z = target.unconstrain({"trans": trans[None], "locs": locs[None]})
    n = 4000
    pyro.set_rng_seed(0)
    draws = target.sample_discrete(z.expand(n, -1), chunk_size=1500)  # chunks of 1500, 1500 and 1000
    x = torch.stack([draws[f"x_{t}"] for t in range(len(y))], -1)
    assert x.shape == (n, len(y)) and x.dtype == torch.long
    marginals, pairs = hmm_posterior(trans, locs, y)
    p = marginals[:, 1]
    assert ((x.double().mean(0) - p).abs() <= Z * (p * (1 - p) / n).sqrt()).all(), (x.double().mean(0), p)
    # the backward sampling keeps neighbours' dependence, not only the marginals
    same = (x[:, 1:] == x[:, :-1]).double().mean(0)
    assert ((same - pairs).abs() <= Z * (pairs * (1 - pairs) / n).sqrt()).all(), (same, pairs)
    # one draw at a time gives the same shapes
    assert target.sample_discrete(z)["x_0"].shape == (1,)


def test_enumerated_sites_in_a_plate_are_drawn_from_their_exact_conditional():
    data = torch.tensor([-2.0, 0.1, 2.5], dtype=D64)
    target = ModelTarget(mixture, (data,), max_plate_nesting=1)
    weights, locs = torch.tensor([0.4, 0.6], dtype=D64), torch.tensor([-1.0, 1.5], dtype=D64)
    z = target.unconstrain({"weights": weights[None], "locs": locs[None]})
    n = 3000
    draws = target.sample_discrete(z.expand(n, -1))["z"]
    assert draws.shape == (n, 3)
    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(data[:, None])
    p = joint.softmax(-1)[:, 1]
    assert ((draws.double().mean(0) - p).abs() <= Z * (p * (1 - p) / n).sqrt()).all()


def test_enumerated_sites_of_a_model_that_does_not_batch_are_drawn_one_draw_at_a_time():
    # `locs[k]` indexes the particle dimension in a particle plate, so the potential falls back to the loop and so
    # do the discrete draws; they are still drawn from the exact conditional
    def unbatchable(data):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=D64), 2.0).to_event(1))
        with pyro.plate("data", data.shape[0]):
            k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6], dtype=D64)))
            pyro.sample("obs", dist.Normal(locs[k], 1.0), obs=data)

    data = torch.tensor([-2.0, 0.1, 2.5], dtype=D64)
    with pytest.warns(UserWarning, match="loop"):
        target = ModelTarget(unbatchable, (data,), max_plate_nesting=1)
    assert target.vectorize == "loop"
    locs = torch.tensor([-1.0, 1.5], dtype=D64)
    n = 800
    draws = target.sample_discrete(target.unconstrain({"locs": locs[None]}).expand(n, -1))["k"]
    assert draws.shape == (n, 3)
    p = (torch.tensor([0.4, 0.6], dtype=D64).log() + dist.Normal(locs, 1.0).log_prob(data[:, None])).softmax(-1)[:, 1]
    assert ((draws.double().mean(0) - p).abs() <= Z * (p * (1 - p) / n).sqrt()).all()
