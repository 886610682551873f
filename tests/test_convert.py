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

from pyro_osds import OSDS, to_datatree
from tests.common import D64


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
    assert set(dt.children) == {"posterior", "sample_stats", "log_likelihood", "observed_data"}
    post = dt["posterior"]
    assert post["w"].dims == ("chain", "draw", "w_dim_0") and post["w"].shape == (2, 200, 2)
    assert post["scale"].dims == ("chain", "draw") and bool((post["scale"] > 0).all())
    stats = dt["sample_stats"]
    for name in ("lp", "log_q", "log_weight"):
        assert stats[name].dims == ("chain", "draw")
    np.testing.assert_allclose(stats["log_weight"].values, (stats["lp"] - stats["log_q"]).values, atol=1e-10)
    assert stats["log_marginal_likelihood"].dims == ("chain",)
    assert dt["log_likelihood"]["obs"].shape == (2, 200, 30)
    assert dt["observed_data"]["obs"].shape == (30,)
    ev = osds.log_evidence()
    assert dt.attrs["log_marginal_likelihood"] == pytest.approx(ev.log_z)
    assert dt.attrs["log_marginal_likelihood_se"] == pytest.approx(ev.se)
    assert dt.attrs["inference_library"] == "pyro_osds" and dt.attrs["num_flow_steps"] == 1
    assert dt.attrs["log_marginal_likelihood_reliable"] == int(ev.reliable) and dt.attrs["too_many_modes"] == 0


def test_pointwise_log_likelihood_sums_to_the_likelihood(osds):
    dt = osds.to_datatree()
    samples = osds.get_samples(group_by_chain=True)
    X, y = osds._args
    logits = samples["scale"][..., None] * (samples["w"] @ X.T)
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(y)
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
    for chain in range(2):
        _, k = az.psislw(idata.sample_stats["log_weight"].values[chain].copy(), reff=1.0)
        assert float(k) == pytest.approx(ev.chains[chain].k_hat, abs=1e-8)
    assert ev.k_hat == max(c.k_hat for c in ev.chains)
    path = tmp_path / "osds.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.posterior["w"].values, idata.posterior["w"].values)
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


def test_az_from_pyro_still_works_but_is_deprecated(osds):
    az = pytest.importorskip("arviz")
    if int(az.__version__.split(".")[0]) >= 1:
        pytest.skip("from_pyro exists in ArviZ 0.x only")
    # ArviZ cannot vectorise `X @ w` for its own log-likelihood and says so (UserWarning)
    with pytest.warns(FutureWarning, match="to_inference_data"), pytest.warns(UserWarning):
        idata = az.from_pyro(osds)
    assert idata.posterior["w"].shape == (2, 200, 2)


def test_arviz_1x_api_on_the_datatree(osds):
    azs = pytest.importorskip("arviz_stats")
    dt = osds.to_datatree()
    summary = azs.summary(dt)
    assert {"scale", "w[0]", "w[1]"} <= set(summary.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loo = azs.loo(dt)
    assert math.isfinite(float(loo.elpd))
    # arviz-stats' psislw takes log-likelihoods (LOO convention: weights = 1 / likelihood), so the
    # importance log-weights go in negated; its revised tail fit agrees with ours (= ArviZ 0.23) closely
    _, k = (-dt["sample_stats"]["log_weight"]).azstats.psislw(dim=["draw"])
    ours = [c.k_hat for c in osds.log_evidence().chains]
    assert list(k.values) == pytest.approx(ours, abs=0.1)


def test_datatree_netcdf_round_trip(osds, tmp_path):
    dt = osds.to_datatree()
    path = tmp_path / "tree.nc"
    dt.to_netcdf(path, engine="h5netcdf")
    back = xr.open_datatree(path, engine="h5netcdf")
    xr.testing.assert_allclose(back["posterior"].to_dataset(), dt["posterior"].to_dataset())
    assert back.attrs["log_marginal_likelihood"] == pytest.approx(dt.attrs["log_marginal_likelihood"])


def test_resampled_output(osds):
    dt = to_datatree(osds, resample=True)
    assert dt.attrs["resampled"] == 1
    assert dt["posterior"]["w"].shape == (2, 200, 2)
    # every resampled draw is one of the raw draws
    raw = osds.get_samples(group_by_chain=True)["w"].numpy()
    res = dt["posterior"]["w"].values
    for c in range(2):
        rows = {tuple(r) for r in raw[c].round(12)}
        assert all(tuple(r) in rows for r in res[c].round(12))


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
    assert set(dt.children) == {"posterior", "sample_stats"}
