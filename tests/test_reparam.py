# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Automatic non-centring (pyro_osds.reparam): which sites, the exact change of variables, the choice, the report."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS
from pyro_osds.model import build_target
from pyro_osds.reparam import NoncenteringConfig, noncenterable_sites, noncentered

D64 = torch.float64
STEPS = 5
WALK = torch.tril(torch.ones(STEPS, STEPS, dtype=D64))


def funnel(dim=4):
    x0 = pyro.sample("x0", dist.Normal(torch.tensor(0.0, dtype=D64), 3.0))
    pyro.sample("xs", dist.Normal(torch.zeros(dim, dtype=D64), torch.exp(0.5 * x0)).to_event(1))


def assorted(y):
    """One site of every kind: candidates (Normal in a plate, StudentT, MultivariateNormal) and not (a fixed scale,
    a latent location only, a positive support, observed)."""
    s = pyro.sample("s", dist.LogNormal(torch.tensor(0.0, dtype=D64), 1.0))
    m = pyro.sample("m", dist.Normal(torch.tensor(0.0, dtype=D64), 1.0))
    pyro.sample("fixed", dist.Normal(m, 2.0))  # location from a latent, scale fixed
    pyro.sample("heavy", dist.StudentT(4.0, m, s))
    pyro.sample("walk", dist.MultivariateNormal(torch.zeros(STEPS, dtype=D64), scale_tril=s * WALK))
    pyro.sample("positive", dist.HalfNormal(s))
    with pyro.plate("groups", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(m, s))
        pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


Y = torch.tensor([0.3, -1.2, 2.0], dtype=D64)


def test_the_sites_whose_scale_depends_on_a_latent_site_are_found():
    pyro.set_rng_seed(0)
    assert noncenterable_sites(funnel) == ["xs"]
    assert noncenterable_sites(assorted, (Y,)) == ["heavy", "walk", "theta"]

    def regression(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    assert noncenterable_sites(regression, (torch.ones(3, 2, dtype=D64), Y)) == []


def test_the_noncentred_potential_is_the_exact_change_of_variables():
    """U_nc(theta, eps) = U(theta, x(theta, eps)) - log|det dx/deps| at random points, in float64."""
    pyro.set_rng_seed(1)
    sites = ("heavy", "walk", "theta")
    centred, _, _ = build_target(assorted, args=(Y,), noncentering=NoncenteringConfig("none", whitening="none"))
    target, _, _ = build_target(assorted, args=(Y,), noncentering=NoncenteringConfig(sites, whitening="none"))
    assert target.noncentered_sites == sites
    assert {s.name for s in target.sites} == {"s", "m", "fixed", "positive", "heavy_decentered", "walk_decentered",
                                              "theta_decentered"}
    z = torch.randn(6, target.dim, dtype=D64, generator=torch.Generator().manual_seed(0))
    nc = target.unpack(z)
    s, m = nc["s"].exp(), nc["m"]
    x = {"s": nc["s"], "m": m, "fixed": nc["fixed"], "positive": nc["positive"],
         "heavy": m + s * nc["heavy_decentered"],
         "walk": s[:, None] * (nc["walk_decentered"] @ WALK.T),
         "theta": m[:, None] + s[:, None] * nc["theta_decentered"]}
    log_det = (1 + STEPS + Y.shape[0]) * nc["s"]  # d heavy, d walk (unit diagonal of WALK), d theta: scale s each
    expected = centred.potential(centred.pack(x)) - log_det
    assert torch.allclose(target.potential(z), expected, rtol=1e-10, atol=1e-10)


def test_auto_noncentres_a_funnel_and_keeps_a_hierarchy_the_data_pin_down():
    pyro.set_rng_seed(0)
    target, _, _ = build_target(funnel, noncentering=NoncenteringConfig("auto"))
    assert target.noncentered_sites == ("xs",)

    def informed(y):  # 4 groups of 50 precise observations: the centred form is the easy one
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(2.0, dtype=D64)))
        with pyro.plate("groups", 4):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            with pyro.plate("rows", 50):
                pyro.sample("y", dist.Normal(theta, 0.1), obs=y)

    y = torch.tensor([-2.0, 0.5, 1.0, 3.0], dtype=D64) + 0.1 * torch.randn(50, 4, dtype=D64)
    target, _, _ = build_target(informed, args=(y,), noncentering=NoncenteringConfig("auto"))
    assert target.noncentered_sites == ()


def test_the_choice_leaves_the_global_random_stream_alone():
    states = []
    for sites in ("none", "auto"):
        pyro.set_rng_seed(3)
        target, _, _ = build_target(funnel, noncentering=NoncenteringConfig(sites))
        states.append(torch.get_rng_state())
    assert target.noncentered_sites == ("xs",)
    assert torch.equal(states[0], states[1])


def test_sites_the_user_addresses_stay_as_written_and_bad_names_are_refused():
    pyro.set_rng_seed(0)
    init = {"x0": torch.tensor(0.0, dtype=D64), "xs": torch.zeros(4, dtype=D64)}
    target, _, _ = build_target(funnel, initial_params=init, noncentering=NoncenteringConfig("auto"))
    assert target.noncentered_sites == ()
    with pytest.raises(ValueError, match=r"\['x0'\].*\['xs'\]"):
        build_target(funnel, noncentering=NoncenteringConfig(("x0",)))
    with pytest.raises(ValueError, match="noncentering"):
        NoncenteringConfig("sometimes")
    with pytest.raises(TypeError, match="noncentering"):
        OSDS(funnel, noncenterng="all")


def test_noncentred_draws_report_the_model_sites_and_survive_save_and_load(tmp_path):
    pyro.set_rng_seed(0)
    osds = OSDS(funnel, preset="smoke", num_samples=50, disable_progbar=True).run()
    assert osds.target.noncentered_sites == ("xs",)
    samples = osds.get_samples(group_by_chain=True)
    assert set(samples) == {"x0", "xs", "xs_decentered"}
    assert torch.allclose(samples["xs"], torch.exp(0.5 * samples["x0"])[..., None] * samples["xs_decentered"])
    idata = osds.to_inference_data()
    assert {"x0", "xs", "xs_decentered"} <= set(idata.posterior.data_vars)
    assert "xs" not in (idata.observed_data.data_vars if "observed_data" in idata.groups() else ())
    path = tmp_path / "funnel.pt"
    osds.save(path)
    loaded = OSDS.load(path, funnel)
    assert loaded.target.noncentered_sites == ("xs",)
    assert loaded.config.reparam.sites == ("xs",)
    assert math.isclose(loaded.log_evidence().log_z, osds.log_evidence().log_z, rel_tol=1e-12)


def test_a_noncentred_model_predicts_with_pyro():
    pyro.set_rng_seed(0)
    osds = OSDS(assorted, preset="smoke", num_samples=20, num_chains=1, disable_progbar=True).run(Y)
    assert osds.target.noncentered_sites, "the prior funnel of theta | s should be non-centred"
    assert noncentered(assorted, ()) is assorted
    predictions = osds.predictive(Y)
    assert predictions["y"].shape == (20, 3)


def test_a_potential_that_passes_the_three_probe_rows_by_a_coincidence_of_shapes_is_not_chosen():
    """``s * eye(3)`` broadcasts with a particle plate of 3 rows but not 16: the plate candidate must not be chosen
    on the probe alone (it crashed at the first batch)."""

    def model(y):
        s = pyro.sample("s", dist.HalfNormal(torch.tensor(1.0, dtype=D64)))
        pyro.sample("walk", dist.MultivariateNormal(torch.zeros(3, dtype=D64), scale_tril=s * torch.eye(3, dtype=D64)))
        pyro.sample("obs", dist.Normal(s, 1.0), obs=y)

    pyro.set_rng_seed(0)
    for sites in ("none", "all"):
        target, _, _ = build_target(model, args=(torch.tensor(0.5, dtype=D64),), noncentering=NoncenteringConfig(sites))
        assert target.potential(torch.zeros(16, target.dim, dtype=D64)).shape == (16,)


def test_the_choice_fit_is_a_start_of_the_preconditioner():
    """The chosen form's mean-field fit reaches the chain's Gaussian fit as a candidate start (between the Laplace fit
    and the identity) when the choice non-centred a site; a model kept as written has none."""
    pyro.set_rng_seed(0)
    osds = OSDS(funnel, preset="smoke", num_samples=20, chain_method="sequential", disable_progbar=True).run()
    start = osds.target.gaussian_start
    assert start is not None and start.shift.shape == (5,) and torch.equal(start.scale_tril, start.scale_tril.tril())
    assert all(s.start is start for s in osds.samplers)
    assert len(osds.samplers[0].report.fit["pilot_elbos"]) == 3  # Laplace fit, start, identity

    def regression(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(w.sum(-1), 1.0), obs=y)

    plain = OSDS(regression, preset="smoke", num_samples=20, num_chains=1, whitening="none",
                 disable_progbar=True).run(Y[0])
    assert plain.target.gaussian_start is None and len(plain.samplers[0].report.fit["pilot_elbos"]) == 2


# a smoke run of 20 draws: how well its weights fit is not what this test checks (its random stream decides it)
@pytest.mark.filterwarnings("ignore:Resampled draws carry only:RuntimeWarning")
def test_a_model_the_user_reparameterised_reports_the_site_and_not_as_data():
    """``poutine.reparam(model, {"theta": LocScaleReparam(0)})``, Pyro's own idiom for NUTS: ``theta`` becomes an
    observed, masked-out Delta without the deterministic flag; it is reported with the posterior, never as data or as
    a pointwise likelihood (``az.loo``)."""
    from pyro import poutine
    from pyro.infer.reparam import LocScaleReparam

    model = poutine.reparam(assorted, config={"theta": LocScaleReparam(centered=0.0)})
    pyro.set_rng_seed(0)
    osds = OSDS(model, preset="smoke", num_samples=20, num_chains=1, noncentering="none", disable_progbar=True).run(Y)
    assert osds.target.observed_sites == ["y"] and "theta" in osds.target.deterministic_sites
    idata = osds.to_inference_data()
    assert "theta" in idata.posterior and "theta_decentered" in idata.posterior
    assert set(idata.observed_data.data_vars) == {"y"} and set(idata.log_likelihood.data_vars) == {"y"}


def test_a_plate_of_random_effects_is_whitened_whatever_the_initial_point():
    # the choice compares mean-field fits; fitted only from the model's initial point (random, from the prior), the
    # whitened form's thousand-odd scattered coordinates were left partly fitted and a 100-group hierarchy was
    # whitened in 5 of 10 global seeds (the 1002-latent hier1000 in 6 of 10; one of the others on an H100 trained
    # 1050 iterations unwhitened to ESS/N 0.05). A cheap block is also fitted from its conditional mean (eps = 0).
    gen = torch.Generator().manual_seed(2100)
    sigma = 0.5 + 1.5 * torch.rand(100, dtype=torch.float64, generator=gen)
    y = 1.0 + torch.randn(100, dtype=torch.float64, generator=gen) + sigma * torch.randn(
        100, dtype=torch.float64, generator=gen)

    def model(sigma, y=None):
        mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), 5.0))
        tau = pyro.sample("tau", dist.HalfNormal(sigma.new_tensor(2.0)))
        with pyro.plate("groups", sigma.shape[0]):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    for seed in (0, 3, 5):  # 3 and 5 were left unwhitened
        pyro.set_rng_seed(seed)
        target = OSDS(model, disable_progbar=True).setup(sigma, y).target
        assert target.whitened_sites in (("theta",), ("theta_decentered",)), seed  # centred or not, whitened
