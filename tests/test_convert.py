# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.convert: ArviZ output (DataTree / InferenceData groups, ArviZ functions, netCDF round trips)."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro.ops.indexing import Vindex

from pyro_osds import OSDS
from pyro_osds.ops.estimators import pareto_k_hat
from tests.common import D64, Z


def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype)))
    pyro.sample("obs", dist.Bernoulli(logits=scale * (X @ w)).to_event(1), obs=y)


@pytest.fixture(scope="module")
def osds():
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, dtype=D64, generator=g)
    y = (torch.rand(30, dtype=D64, generator=g) < torch.sigmoid(X @ torch.tensor([1.5, -1.0], dtype=D64))).to(D64)
    return OSDS(model, num_samples=200, preset="smoke").run(X, y)


def test_datatree_layout(osds):
    dt = osds.to_datatree()
    assert isinstance(dt, xr.DataTree)
    assert set(dt.children) == {"posterior", "sample_stats", "weighted_posterior", "weighted_sample_stats",
                                "log_likelihood", "observed_data"}
    for group in ("posterior", "weighted_posterior"):
        post = dt[group]
        assert post["w"].dims == ("chain", "draw", "w_dim_0") and post["w"].shape == (2, 200, 2)
        assert post["scale"].dims == ("chain", "draw") and bool((post["scale"] > 0).all())
    weighted = dt["weighted_sample_stats"]
    for name in ("lp", "log_q", "log_weight"):
        assert weighted[name].dims == ("chain", "draw")
    np.testing.assert_allclose(weighted["log_weight"].values, (weighted["lp"] - weighted["log_q"]).values, atol=1e-10)
    np.testing.assert_allclose(weighted["log_weight"].values.reshape(-1), osds.log_weights.numpy())
    ev = osds.log_evidence()
    stats = dt["sample_stats"]
    assert set(stats.data_vars) == {"lp", "log_marginal_likelihood", "log_marginal_likelihood_se", "ess_kish",
                                    "pareto_k"}
    assert stats["lp"].dims == ("chain", "draw") and stats["ess_kish"].dims == ("chain",)
    np.testing.assert_allclose(stats["ess_kish"].values, [c.ess for c in ev.chains])
    np.testing.assert_allclose(stats["pareto_k"].values, [c.k_hat for c in ev.chains])
    assert stats.attrs["ess_kish"] == pytest.approx(ev.ess) and stats.attrs["pareto_k"] == pytest.approx(ev.k_hat)
    assert dt["log_likelihood"]["obs"].shape == (2, 200, 30)
    assert dt["observed_data"]["obs"].shape == (30,)
    assert dt.attrs["log_marginal_likelihood"] == pytest.approx(ev.log_z)
    assert dt.attrs["log_marginal_likelihood_se"] == pytest.approx(ev.se)
    assert dt.attrs["inference_library"] == "pyro_osds" and dt.attrs["num_flow_steps"] == 1
    assert dt.attrs["log_marginal_likelihood_reliable"] == int(ev.reliable) and dt.attrs["too_many_modes"] == 0
    assert dt.attrs["resampled"] == 1


def test_posterior_holds_the_resampled_draws_of_each_chain(osds):
    dt = osds.to_datatree()
    grouped = osds.get_samples(group_by_chain=True)
    np.testing.assert_array_equal(dt["posterior"]["w"].values, grouped["w"].numpy())  # the same resampling
    raw = dt["weighted_posterior"]["w"].values
    np.testing.assert_array_equal(raw, osds.get_samples(group_by_chain=True, resample=False)["w"].numpy())
    post, lp = dt["posterior"]["w"].values, dt["sample_stats"]["lp"].values
    raw_lp = dt["weighted_sample_stats"]["lp"].values
    for c in range(2):
        # each posterior draw is a draw of its own chain, with that draw's lp
        match = (post[c][:, None, :] == raw[c][None, :, :]).all(-1)
        first = match.argmax(1)
        assert bool(match.any(1).all())
        np.testing.assert_array_equal(lp[c], raw_lp[c][first])


def test_raw_weighted_layout(osds):
    dt = osds.to_datatree(resample=False)
    assert set(dt.children) == {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    assert dt.attrs["resampled"] == 0
    stats = dt["sample_stats"]
    np.testing.assert_allclose(stats["log_weight"].values, (stats["lp"] - stats["log_q"]).values, atol=1e-10)
    np.testing.assert_array_equal(dt["posterior"]["w"].values,
                                  osds.get_samples(group_by_chain=True, resample=False)["w"].numpy())


def test_pointwise_log_likelihood_sums_to_the_likelihood(osds):
    dt = osds.to_datatree()
    w, scale = (torch.as_tensor(dt["posterior"][k].values) for k in ("w", "scale"))
    X, y = osds.model_args
    expected = torch.distributions.Bernoulli(logits=scale[..., None] * (w @ X.T)).log_prob(y)
    np.testing.assert_allclose(dt["log_likelihood"]["obs"].values, expected.numpy(), atol=1e-10)


def test_arviz_0x_functions(osds, tmp_path):
    az = pytest.importorskip("arviz")
    if int(az.__version__.split(".")[0]) >= 1:
        pytest.skip("ArviZ 0.x API")
    idata = osds.to_inference_data()
    assert isinstance(idata, az.InferenceData)
    summary = az.summary(idata)
    assert {"w[0]", "w[1]", "scale"} <= set(summary.index)
    assert float(az.ess(idata)["scale"]) > 50
    assert float(az.rhat(idata)["scale"]) < 1.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's own warning about influential observations
        loo = az.loo(idata)
    assert math.isfinite(float(loo.elpd_loo))
    ev = osds.log_evidence()
    for chain in range(2):  # the tail fit is ArviZ's (the runner's k-hat reads the diagnostic draws too: test_checks)
        log_w = idata.weighted_sample_stats["log_weight"].values[chain]
        _, k = az.psislw(log_w.copy(), reff=1.0)
        assert float(k) == pytest.approx(pareto_k_hat(torch.from_numpy(log_w)), abs=1e-8)
    assert ev.k_hat == max(c.k_hat for c in ev.chains)
    path = tmp_path / "osds.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.posterior["w"].values, idata.posterior["w"].values)
    np.testing.assert_allclose(back.weighted_sample_stats["log_weight"].values,
                               idata.weighted_sample_stats["log_weight"].values)
    assert back.attrs["log_marginal_likelihood"] == pytest.approx(idata.attrs["log_marginal_likelihood"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        # ArviZ 0.23's plotting code uses an API that matplotlib >= 3.11 deprecates
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        az.plot_posterior(idata, var_names=["scale"])
        az.plot_trace(idata, var_names=["w"])
    plt.close("all")


def test_arviz_1x_api_on_the_datatree(osds):
    azs = pytest.importorskip("arviz_stats")
    dt = osds.to_datatree()
    summary = azs.summary(dt)
    assert {"scale", "w[0]", "w[1]"} <= set(summary.index)
    # the DataTree's posterior is equally weighted: arviz-stats' mean is the importance-weighted one, to Monte
    # Carlo error (the weights' Kish ESS)
    ours, ess = osds.summary_dict()["scale"], osds.log_evidence().ess
    assert abs(float(summary.loc["scale", "mean"]) - float(ours["mean"])) <= Z * float(ours["std"]) / math.sqrt(ess) + 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loo = azs.loo(dt)
    assert math.isfinite(float(loo.elpd))
    # arviz-stats' psislw takes log-likelihoods (LOO convention: weights = 1 / likelihood), so the
    # importance log-weights go in negated; its revised tail fit agrees with ours (= ArviZ 0.23) closely
    _, k = (-dt["weighted_sample_stats"]["log_weight"]).azstats.psislw(dim=["draw"])
    ours = [pareto_k_hat(torch.from_numpy(lw)) for lw in dt["weighted_sample_stats"]["log_weight"].values]
    assert list(k.values) == pytest.approx(ours, abs=0.1)


def test_datatree_netcdf_round_trip(osds, tmp_path):
    dt = osds.to_datatree()
    path = tmp_path / "tree.nc"
    dt.to_netcdf(path, engine="h5netcdf")
    back = xr.open_datatree(path, engine="h5netcdf")
    for group in dt.children:
        xr.testing.assert_allclose(back[group].to_dataset(), dt[group].to_dataset())
    assert back.attrs["log_marginal_likelihood"] == pytest.approx(dt.attrs["log_marginal_likelihood"])


def test_custom_dims_and_coords(osds):
    dt = osds.to_datatree(dims={"w": ["feature"], "obs": ["observation"]}, coords={"feature": ["a", "b"]})
    assert dt["posterior"]["w"].dims == ("chain", "draw", "feature")
    assert list(dt["posterior"]["feature"].values) == ["a", "b"]
    assert dt["log_likelihood"]["obs"].dims == ("chain", "draw", "observation")
    with pytest.raises(ValueError, match="names 2 dims"):
        osds.to_datatree(dims={"w": ["a", "b"]})


def test_potential_results_have_no_model_groups():
    osds = OSDS(potential_fn=lambda p: 0.5 * (p["x"] ** 2).sum(), initial_params={"x": torch.zeros(2, dtype=D64)},
                num_samples=50, preset="smoke", num_chains=1).run()
    dt = osds.to_datatree()
    assert set(dt.children) == {"posterior", "sample_stats", "weighted_posterior", "weighted_sample_stats"}


# ------------------------------------------------------------------------------------------------
# the ArviZ workflow on weighted draws, against exact answers
def beta_bernoulli(y):
    p = pyro.sample("p", dist.Beta(torch.tensor(1.0, dtype=D64), torch.tensor(1.0, dtype=D64)))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Bernoulli(p), obs=y)


def beta_hdi(a, b, prob):
    """The exact highest-density interval of Beta(a, b) (unimodal): the shortest interval of mass ``prob``."""
    from scipy import optimize, stats

    width = lambda lo: stats.beta.ppf(lo + prob, a, b) - stats.beta.ppf(lo, a, b)  # noqa: E731
    lo = optimize.minimize_scalar(width, bounds=(0, 1 - prob), method="bounded", options={"xatol": 1e-10}).x
    return stats.beta.ppf(lo, a, b), stats.beta.ppf(lo + prob, a, b)


def test_arviz_workflow_agrees_with_the_weighted_truth(tmp_path):
    az = pytest.importorskip("arviz")
    if int(az.__version__.split(".")[0]) >= 1:
        pytest.skip("ArviZ 0.x API")
    from scipy import stats

    # an untrained sampler (the Laplace fit in logit space) of a skewed Beta(4, 18) posterior: the draws are
    # far from equally weighted, so unweighted statistics of them are wrong by many Monte Carlo errors
    y = torch.zeros(20, dtype=D64)
    y[:3] = 1
    a, b = 4.0, 18.0
    pyro.set_rng_seed(0)
    osds = OSDS(beta_bernoulli, num_samples=2000, preset="smoke", num_iterations=0, precondition="laplace",
                early_stopping=False, disable_progbar=True).run(y)
    ess = osds.log_evidence().ess
    mean, sd = stats.beta.mean(a, b), stats.beta.std(a, b)
    lo, hi = beta_hdi(a, b, 0.9)
    quantile_se = math.sqrt(0.05 * 0.95 / ess) / min(stats.beta.pdf(lo, a, b), stats.beta.pdf(hi, a, b))
    idata = osds.to_inference_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's own warnings (few observations for LOO)
        summary = az.summary(idata, var_names=["p"], hdi_prob=0.9)
        raw = az.summary(idata.weighted_posterior, var_names=["p"], hdi_prob=0.9)
        hdi = az.hdi(idata, var_names=["p"], hdi_prob=0.9)["p"].values
        loo = az.loo(idata)
    ours = osds.summary_dict()["p"]
    assert abs(summary.loc["p", "mean"] - mean) <= Z * sd / math.sqrt(ess) + 1e-3  # + the table's rounding
    assert abs(summary.loc["p", "mean"] - float(ours["mean"])) <= Z * sd / math.sqrt(ess) + 1e-3
    assert abs(summary.loc["p", "sd"] - sd) <= Z * sd / math.sqrt(2 * ess) + 1e-3
    assert abs(hdi[0] - lo) <= Z * quantile_se and abs(hdi[1] - hi) <= Z * quantile_se, (hdi, lo, hi)
    # the raw draws (what ArviZ summarised before) are off by many standard errors
    assert abs(raw.loc["p", "mean"] - mean) > 2 * Z * sd / math.sqrt(ess)
    # ArviZ's autocorrelation ESS of the resampled draws sees the copies: not above the weights' Kish ESS
    assert summary.loc["p", "ess_bulk"] <= 1.05 * ess
    # PSIS-LOO of the pointwise log-likelihood at the posterior draws, against exact leave-one-out:
    # p(y_i | y_-i) = E[p | y_-i] or 1 - E[p | y_-i] for Beta-Bernoulli
    exact_elpd = sum(math.log((a - yi) / (a + b - 1) if yi else (b - 1 + yi) / (a + b - 1)) for yi in y.tolist())
    assert abs(float(loo.elpd_loo) - exact_elpd) <= 0.1, (float(loo.elpd_loo), exact_elpd)
    path = tmp_path / "beta.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_array_equal(back.posterior["p"].values, idata.posterior["p"].values)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        az.plot_trace(idata, var_names=["p"])
        az.plot_posterior(idata, var_names=["p"], hdi_prob=0.9)
    plt.close("all")


# ------------------------------------------------------------------------------------------------
# deterministic sites and posterior predictive draws
def eight_schools(sigma, y=None, pooled=False):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=D64)))
    with pyro.plate("school", len(sigma)):
        eta = pyro.sample("eta", dist.Normal(torch.tensor(0.0, dtype=D64), 1.0))
        theta = pyro.deterministic("theta", mu + (0.0 if pooled else tau) * eta)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=D64)
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=D64)


@pytest.fixture(scope="module")
def schools():
    pyro.set_rng_seed(0)
    return OSDS(eight_schools, num_samples=300, preset="smoke", disable_progbar=True).run(SCHOOLS_SIGMA, SCHOOLS_Y)


def test_deterministic_sites_are_posterior_quantities(schools):
    dt = schools.to_datatree()
    assert "theta" not in dt["observed_data"] and "theta" not in dt["log_likelihood"]
    assert set(dt["log_likelihood"].data_vars) == {"obs"} and set(dt["observed_data"].data_vars) == {"obs"}
    for group in ("posterior", "weighted_posterior"):
        post = dt[group]
        assert post["theta"].dims == ("chain", "draw", "theta_dim_0")
        np.testing.assert_allclose(post["theta"].values,
                                   post["mu"].values[..., None] + post["tau"].values[..., None] * post["eta"].values,
                                   atol=1e-12)
    assert schools.target.deterministic_sites == ["theta"] and schools.target.observed_sites == ["obs"]


def test_loo_waic_and_compare_work_with_deterministic_sites(schools):
    az = pytest.importorskip("arviz")
    if int(az.__version__.split(".")[0]) >= 1:
        pytest.skip("ArviZ 0.x API")
    pyro.set_rng_seed(1)
    pooled = OSDS(eight_schools, num_samples=300, preset="smoke", disable_progbar=True).run(
        SCHOOLS_SIGMA, SCHOOLS_Y, pooled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ: high Pareto k / WAIC variance warnings on 8 points
        warnings.filterwarnings("ignore", message=".*inplace keyword.*")  # ArviZ 0.23's az.compare on pandas 3
        loo, waic = az.loo(schools.to_inference_data()), az.waic(schools.to_inference_data())
        table = az.compare({"hierarchical": schools.to_inference_data(), "pooled": pooled.to_inference_data()})
    assert math.isfinite(float(loo.elpd_loo)) and math.isfinite(float(waic.elpd_waic))
    assert set(table.index) == {"hierarchical", "pooled"} and sorted(table["rank"]) == [0, 1]
    assert np.isfinite(table["elpd_loo"].values).all() and table["weight"].sum() == pytest.approx(1.0)


def test_posterior_predictive_draws_line_up_with_the_posterior(schools):
    pp = schools.predictive()
    assert set(pp) == {"obs"} and pp["obs"].shape == (600, 8)
    dt = schools.to_datatree(posterior_predictive=pp)
    assert dt["posterior_predictive"]["obs"].dims == ("chain", "draw", "obs_dim_0")
    # y_rep ~ N(theta, sigma) at the same draw: standardised residuals are N(0, 1), not those of a shuffle
    theta = torch.as_tensor(dt["posterior"]["theta"].values)
    resid = (torch.as_tensor(dt["posterior_predictive"]["obs"].values) - theta) / SCHOOLS_SIGMA
    assert abs(float(resid.mean())) <= Z / math.sqrt(resid.numel()) * 3 and abs(float(resid.std()) - 1) < 0.05
    # new covariates: predict at them (the observed site is sampled, not the data)
    more = schools.predictive(torch.full((8,), 1e-3, dtype=D64), return_sites=["obs", "theta"])
    assert more["obs"].shape == (600, 8) and not torch.equal(more["obs"], SCHOOLS_Y.expand(600, 8))
    np.testing.assert_allclose(more["theta"].numpy(), theta.reshape(600, 8).numpy(), atol=1e-12)
    assert float((more["obs"] - more["theta"]).abs().max()) < 0.01  # tiny noise: y_rep at its own draw's theta
    with pytest.raises(ValueError, match="posterior_predictive"):
        schools.to_datatree(posterior_predictive={"obs": pp["obs"][:10]})


def test_factor_sites_are_neither_data_nor_likelihood():
    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=D64), 1.0))
        pyro.factor("soft_constraint", -0.5 * loc**2)  # a term of the density, not data
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    y = torch.tensor([0.3, -0.2, 1.1], dtype=D64)
    pyro.set_rng_seed(0)
    osds = OSDS(model, num_samples=100, preset="smoke", num_chains=1, disable_progbar=True).run(y)
    dt = osds.to_datatree()
    assert set(dt["observed_data"].data_vars) == {"y"} and set(dt["log_likelihood"].data_vars) == {"y"}
    # the factor still counts in the density: the posterior is N(sum y / 5, 1 / 5) (precision 1 + 1 + 3)
    assert abs(float(osds.summary_dict()["loc"]["mean"]) - float(y.sum()) / 5) < 0.05


def test_deterministic_sites_of_a_model_with_enumerated_sites_use_the_discrete_draws():
    def mixture(data):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=data.dtype)))
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=data.dtype), 5.0).to_event(1))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.deterministic("assigned_loc", Vindex(locs)[..., z])
            pyro.sample("obs", dist.Normal(Vindex(locs)[..., z], 1.0), obs=data)

    g = torch.Generator().manual_seed(3)
    data = torch.cat([torch.randn(6, dtype=D64, generator=g) - 3, torch.randn(4, dtype=D64, generator=g) + 3])
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no pointwise log-likelihood with enumerated sites (said)
        osds = OSDS(mixture, num_samples=40, preset="smoke", num_chains=1, max_plate_nesting=1,
                    disable_progbar=True).run(data)
        dt = osds.to_datatree()
    post = dt["posterior"]
    z, locs = post["z"].values, post["locs"].values
    expected = np.take_along_axis(locs, z.reshape(1, 40, 10).astype(int), axis=-1)
    np.testing.assert_allclose(post["assigned_loc"].values, expected)
