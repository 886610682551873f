# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.samplers: FlowSampler with each training method, its preconditioner and its mode reports."""

import math
import warnings

import pyro
import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.modes import warn_lost_modes
from pyro_osds.ops.consistency import consistency_function
from pyro_osds.ops.estimators import evidence
from pyro_osds.ops.integrate import flow
from pyro_osds.ops.marginal import MarginalMixtureMap
from pyro_osds.ops.mode_search import uncovered_modes
from pyro_osds.ops.tails import TailAffineMap
from pyro_osds.samplers import FlowSampler, MixtureSampler, build_sampler, restore_sampler
from tests.common import (
    D64,
    LOG_Z,
    Z,
    batched,
    gaussian_mixture_potential,
    mixture_potential,
    two_mode_potential,
    within,
)


def test_dis_path_weights_are_accurate_at_its_natural_step_count_and_collapse_at_one():
    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("dis", num_iterations=300, grid_size=16, precondition="none", dtype=None)
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    many = sampler.em_evidence(4000, num_steps=16)
    one = sampler.em_evidence(4000, num_steps=1)
    assert abs(many.log_z - LOG_Z) <= Z * many.se + 0.5 * many.se**2, many
    assert many.ess_per_draw > 0.2 and one.ess_per_draw < 0.02 and one.elbo < many.elbo - 1.0


def test_scds_teacher_is_the_current_network():
    config = OSDSConfig.for_method("scds")
    assert config.objective.diffusion.sd_teacher == "current" and config.objective.diffusion.volume_weight == 0.0 and config.objective.diffusion.sd_warmup == 0
    assert config.option("sd_weight") == 1.0 and config.option("diffusion_loss") == "lv"
    pyro.set_rng_seed(0)
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config.replace(num_iterations=3, grid_size=8, dtype=None),
                          disable_progbar=True)
    history = sampler.fit()
    assert all(math.isfinite(v) for v in history["sd_loss"])
    # no volume term and no Jacobian penalty: the distillation loss is the state term alone
    assert history["sd_loss"] == pytest.approx(history["state_loss"], rel=1e-12)


def test_cdds_reproduces_its_teachers_ode_endpoints():
    def skewed(x):
        return batched(x) + 0.3 * torch.nn.functional.softplus(2 * x[:, 0])

    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("cdds", num_iterations=200, consistency_iterations=600, grid_size=16,
                                   precondition="none", dtype=None)
    sampler = FlowSampler(skewed, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    z0 = sampler.process.sample_prior(2000, 3, dtype=D64, generator=torch.Generator().manual_seed(1))
    teacher = sampler.trainers[0].sampling_net
    endpoints = flow(teacher, sampler.whitened_potential, sampler.process, z0, 16, log_det="none").x
    student = consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process, z0, 16.0).f
    untrained = consistency_function(teacher, sampler.whitened_potential, sampler.process, z0, 16.0).f
    rmse = ((student - endpoints) ** 2).mean(0).sqrt()
    spread = endpoints.std(0)
    assert bool((rmse < 0.25 * spread).all()), rmse / spread
    assert bool((rmse < 0.2 * ((untrained - endpoints) ** 2).mean(0).sqrt()).all())


def test_sampler_warns_and_covers_separated_modes():
    sampler = FlowSampler(two_mode_potential, torch.zeros(2, dtype=D64), OSDSConfig(mode_search_starts=8),
                          generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="at least 2 separated modes"):
        affine = sampler.fit_preconditioner()
    assert float((affine.scale_tril @ affine.scale_tril.T)[0, 0]) > 5.0  # broad enough to hold both modes


@pytest.mark.parametrize("preset, advice", [("cpu", "add the paper's diffusion objective"),
                                            ("paper-cpu", "can still drop modes")])
def test_mode_warning_advice_fits_the_objective(preset, advice):
    sampler = FlowSampler(two_mode_potential, torch.zeros(2, dtype=D64),
                          OSDSConfig.preset(preset, mode_search_starts=8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=advice):
        sampler.fit_preconditioner()


def test_a_lost_mode_is_reported_with_its_size():
    # The one-step objective alone is mode-seeking: on the 0.3 / 0.7 mixture it drops the lighter mode,
    # and its weights (ESS/N ~ 1) cannot show that. The mode search found both modes, so the draws'
    # weighted share near each is checked; the lost mass predicts the log Z deficit, log 0.7.
    pyro.set_rng_seed(0)
    config = OSDSConfig(num_iterations=300)
    sampler = FlowSampler(mixture_potential, torch.zeros(2, dtype=D64), config,
                          generator=torch.Generator().manual_seed(0), disable_progbar=True)
    with pytest.warns(UserWarning, match="separated modes"):
        sampler.fit_preconditioner()
    sampler.fit()
    draws = sampler.draw(8000, 1)
    est = evidence(draws.log_weight, num_folded=draws.num_folded)
    with pytest.warns(RuntimeWarning, match=r"almost no weight near 1 of the 2 modes .* low by about 0.36 nats"):
        check = sampler.check_modes(draws)
        warn_lost_modes(check, config.objective)
    assert check.lost == (1,)
    assert within(est.log_z, math.log(0.7), est.se, bias=0.5 * est.se**2 + 0.01), est


def _two_modes_potential(x):
    a = -0.5 * ((x[..., 0] - 3.0) ** 2)
    b = -0.5 * ((x[..., 0] + 3.0) ** 2)
    return -torch.logaddexp(a, b) + 0.5 * x[..., 1] ** 2


def test_a_reloaded_multimodal_sampler_resumes_with_the_same_gradient_estimator():
    config = OSDSConfig.preset("smoke", mode_search_starts=8, num_iterations=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mode search warns about the two modes
        full = FlowSampler(_two_modes_potential, torch.zeros(2, dtype=torch.float64), config,
                           generator=torch.Generator().manual_seed(0), disable_progbar=True)
        full.fit(3)
        state = full.state_dict()
        full.fit()
        resumed = FlowSampler(_two_modes_potential, torch.zeros(2, dtype=torch.float64), config,
                              generator=torch.Generator().manual_seed(1), disable_progbar=True)
        resumed.load_state_dict(state)
        assert full.flow_kl_gradient == resumed.flow_kl_gradient == "total"
        resumed.fit()
    for p, q in zip(full.trainer.net.parameters(), resumed.trainer.net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_cdds_chain_has_two_phases_and_an_invertible_map():
    config = OSDSConfig.for_method("cdds", grid_size=8, num_iterations=4, consistency_iterations=4, hidden_dim=8,
                                   batch_size=8, precondition="none", dtype=None)
    sampler = FlowSampler(lambda x: 0.5 * (x**2).sum(-1), torch.zeros(2, dtype=torch.float64), config,
                          generator=torch.Generator().manual_seed(0), disable_progbar=True)
    with pytest.raises(RuntimeError, match="not trained yet"):
        sampler.sampling_net  # noqa: B018
    sampler.fit()
    assert sampler.num_phases == 2 and [t.step for t in sampler.trainers] == [4, 4]
    draws = sampler.draw(50)
    log_q, ok = sampler.log_q(draws.x)
    assert bool(ok.all())
    torch.testing.assert_close(log_q, draws.log_q, rtol=0, atol=1e-8)
    forward = sampler.forward_evidence(torch.randn(200, 2, dtype=torch.float64))
    assert math.isfinite(forward.log_z)


THREE_MODES = ([[-4.0, 0.0, 0.0], [4.0, 1.0, 0.0], [0.0, 6.0, -3.0]], [0.1, 0.3, 0.6])


def test_a_multimodal_target_gets_a_mixture_with_a_component_per_mode():
    potential = gaussian_mixture_potential(*THREE_MODES, scale=0.7)  # log Z = 0
    sampler = build_sampler(potential, torch.zeros(3, dtype=D64), OSDSConfig(num_iterations=40),
                            generator=torch.Generator().manual_seed(0), disable_progbar=True)
    assert isinstance(sampler, MixtureSampler) and len(sampler.components) == 3
    sampler.fit()
    assert sampler.trained == [False, False, False]  # Gaussian pieces: the preconditioners alone fit them
    draws = sampler.draw(4000)
    est = draws.evidence()
    assert within(est.log_z, 0.0, est.se, bias=0.5 * est.se**2) and est.ess_per_draw > 0.9, est
    w = torch.softmax(draws.log_weight, 0)
    nearest = torch.cdist(draws.x, torch.tensor(THREE_MODES[0], dtype=D64)).argmin(-1)
    shares = torch.zeros(3, dtype=D64).index_add_(0, nearest, w)
    assert bool(((shares - torch.tensor(THREE_MODES[1], dtype=D64)).abs() <= Z * (0.25 / est.ess) ** 0.5).all())
    # draws of component k come from mode k; each component's mixture weight tracks its mode's mass
    assert sorted(sampler.weights.tolist()) == pytest.approx([0.1, 0.3, 0.6], abs=0.05)
    restored = restore_sampler(potential, torch.zeros(3, dtype=D64), sampler.config, sampler.state_dict())
    assert isinstance(restored, MixtureSampler) and torch.equal(restored.weights, sampler.weights)
    torch.testing.assert_close(restored.draw(50).log_weight, sampler.draw(50).log_weight, rtol=0, atol=0)


def test_a_chain_with_fitted_tails_draws_through_them_and_restores_them():
    # a skewed 3-D target (a log-Gamma coordinate of shape 1 beside two Gaussians): the tail-adaptive
    # preconditioner is fitted, used by the transport (exact weights) and saved with the chain
    def skewed(x):
        return -(x[:, 0] - 2.0 * x[:, 0].exp()) + 0.5 * (x[:, 1:] ** 2).sum(-1)

    log_z = -math.log(2.0) + math.log(2 * math.pi)
    config = OSDSConfig(num_iterations=60, precondition_tails=True)
    sampler = build_sampler(skewed, torch.zeros(3, dtype=D64), config, disable_progbar=True,
                            generator=torch.Generator().manual_seed(0))
    sampler.fit()
    pre = sampler.preconditioner
    assert isinstance(pre, TailAffineMap) and float(pre.left[0]) < 0.9 < 1.1 < float(pre.right[0])
    est = sampler.draw(4000).evidence()
    assert within(est.log_z, log_z, est.se, bias=0.5 * est.se**2) and est.ess_per_draw > 0.9, est
    restored = restore_sampler(skewed, torch.zeros(3, dtype=D64), sampler.config, sampler.state_dict())
    assert isinstance(restored.preconditioner, TailAffineMap)
    torch.testing.assert_close(restored.draw(50).log_weight, sampler.draw(50).log_weight, rtol=0, atol=0)


def test_one_mode_or_a_single_flow_asked_for_give_a_flow_sampler():
    unimodal = build_sampler(batched, torch.zeros(3, dtype=D64), OSDSConfig(), disable_progbar=True,
                             generator=torch.Generator().manual_seed(0))
    assert isinstance(unimodal, FlowSampler) and unimodal.search.saturated and len(unimodal.search.modes) == 1
    single = build_sampler(gaussian_mixture_potential(*THREE_MODES), torch.zeros(3, dtype=D64),
                           OSDSConfig(components="single"), generator=torch.Generator().manual_seed(0))
    assert isinstance(single, FlowSampler) and len(single.search.modes) == 3
    with pytest.warns(UserWarning, match="at least 3 separated modes"):
        single.fit_preconditioner()  # one flow over a Gaussian covering the three


def test_a_map_that_already_fits_is_not_trained_and_its_draws_are_untouched():
    # the 3-D Gaussian: its Laplace preconditioner is exact, so the untrained one-step map fits
    def build(**options):
        return FlowSampler(batched, torch.zeros(3, dtype=D64), OSDSConfig(**options), disable_progbar=True,
                           generator=torch.Generator().manual_seed(0))

    sampler = build()
    sampler.fit()
    assert sampler.iteration == 0 and "already fits" in sampler.trainer.stop_reason
    untouched = build()  # no pilot: the same draws
    torch.testing.assert_close(sampler.draw(50).x, untouched.draw(50).x, rtol=0, atol=0)
    trained = build(early_stopping=False, num_iterations=5)
    trained.fit()
    assert trained.iteration == 5 and trained.trainer.stop_reason is None
    two_steps = FlowSampler(batched, torch.zeros(3, dtype=D64), OSDSConfig(num_steps=2), disable_progbar=True)
    assert not two_steps.fits_untrained()  # trained on two-step maps too: not the untrained one-step map


def _two_well_product(dim, weight=0.25, gap=7.0):
    """A product of 1-D mixtures weight N(-gap/2, 1) + (1 - weight) N(gap/2, 1), normalised (log Z = 0):
    2^dim modes, more than the mode search enumerates."""
    def potential(x):
        a = math.log(weight) - 0.5 * (x + gap / 2) ** 2
        b = math.log1p(-weight) - 0.5 * (x - gap / 2) ** 2
        return -(torch.logaddexp(a, b) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return potential


def test_more_modes_than_the_search_enumerates_get_the_marginal_mixture_and_the_right_log_z():
    dim = 10
    potential = _two_well_product(dim)
    init = torch.zeros(dim, dtype=D64)

    def build(**options):
        sampler = FlowSampler(potential, init, OSDSConfig(num_iterations=60, **options), disable_progbar=True,
                              generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler.fit()
        return sampler, " ".join(str(w.message) for w in caught)

    sampler, said = build()
    assert sampler.report.saturated is False and sampler.report.marginal_mixture and "marginal mixture" in said
    draws = sampler.draw(4000)
    est = draws.evidence()
    assert within(est.log_z, 0.0, est.se) and est.ess_per_draw > 0.5
    assert torch.allclose((draws.x < 0).to(D64).T @ torch.softmax(draws.log_weight, 0),
                          torch.full((dim,), 0.25, dtype=D64), atol=0.03)  # every coordinate's light well
    assert not sampler.too_many_modes and sampler.check_modes(draws).lost == ()
    # a checkpoint holds the marginal mixture: the reloaded sampler draws the same points with the same weights
    reloaded = FlowSampler(potential, init, OSDSConfig(num_iterations=60), disable_progbar=True)
    reloaded.load_state_dict(sampler.state_dict())
    assert isinstance(reloaded.preconditioner, MarginalMixtureMap)
    assert reloaded.report.marginal_mixture and reloaded.modes and not reloaded.too_many_modes
    again, fresh = sampler.draw(50, generator=torch.Generator().manual_seed(3)), reloaded.draw(
        50, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again.log_weight, fresh.log_weight, rtol=0, atol=1e-12)
    # the ablation: a Gaussian at the heaviest mode found keeps few wells, and says so
    gaussian, said = build(marginal_components=0)
    assert gaussian.too_many_modes and "unreliable" in said
    lost = gaussian.draw(2000)
    assert lost.evidence().log_z < -1.0  # 10 light wells of 1/4 missed: about 10 log(4/3) low
    # the coverage test sees it: the Gaussian's density at the found modes' centres is far below the target's
    centres = torch.stack([c for c, _ in gaussian.modes])
    log_q, _ = gaussian.log_q(centres)
    assert len(uncovered_modes(-potential(centres) - log_q, lost.evidence().log_z)) > len(centres) // 2


def test_a_product_whose_found_modes_are_all_light_but_one_still_gets_every_well():
    # light wells of 1/20: each flip costs a factor 19, so the search keeps only the heaviest mode it found and
    # drops the other 2047 as light, yet together they show both wells of every coordinate and, through their
    # masses, each well's weight
    dim = 24
    potential = _two_well_product(dim, weight=0.05, gap=7.0)
    sampler = FlowSampler(potential, torch.zeros(dim, dtype=D64), OSDSConfig(num_iterations=60), disable_progbar=True,
                          generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sampler.fit()
    report = sampler.report
    assert report.saturated is False and report.num_modes == 1 and report.num_light > 1000
    assert isinstance(sampler.preconditioner, MarginalMixtureMap) and not sampler.too_many_modes
    draws = sampler.draw(4000)
    est = draws.evidence()
    assert est.reliable and within(est.log_z, 0.0, est.se)  # truth 0
    low_share = (draws.x < 0).to(D64).T @ torch.softmax(draws.log_weight, 0)
    assert torch.allclose(low_share, torch.full((dim,), 0.05, dtype=D64), atol=0.02)
    assert sampler.check_modes(draws).lost == ()


def test_training_that_lowers_the_pilot_elbo_gives_the_untrained_network_back():
    def banana(x):
        return 0.5 * x[..., 0] ** 2 + 0.5 * (x[..., 1] - x[..., 0] ** 2) ** 2 / 0.25

    def build(num_iterations=20, **options):
        return FlowSampler(banana, torch.zeros(2, dtype=D64), OSDSConfig(num_iterations=num_iterations, **options),
                           disable_progbar=True, generator=torch.Generator().manual_seed(0))

    untrained = build()
    pilot = untrained._pilot_estimate()
    assert not untrained.fits_untrained(pilot)  # so training runs
    wrecked = build(learning_rate=3.0, grad_clip=1e6)  # steps far too large: training makes the map worse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrecked.fit()
    assert wrecked.iteration > 0 and "the untrained network is kept" in wrecked.trainer.stop_reason
    for p, q in zip(wrecked.sampling_net.parameters(), untrained.sampling_net.parameters(), strict=True):
        assert torch.equal(p, q)
    assert wrecked._pilot_estimate().elbo == pilot.elbo
    trained = build(200)  # the defaults improve on it, and keep what they trained
    trained.fit()
    assert "kept" not in (trained.trainer.stop_reason or "") and trained._pilot_estimate().elbo > pilot.elbo


def test_wells_along_no_coordinate_are_flagged_not_returned_as_a_confident_wrong_answer():
    # the same kind of product, rotated: its wells lie along no coordinate, so a product of marginals covers a
    # box of false modes and misses the true ones; the found modes' centre weights show it
    dim = 10
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=D64))[0]
    product = _two_well_product(dim, weight=0.5)  # 1024 modes of equal mass

    def potential(x):
        return product(x @ rotation)

    sampler = FlowSampler(potential, torch.zeros(dim, dtype=D64), OSDSConfig(num_iterations=30),
                          disable_progbar=True, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler.fit()
    assert sampler.report.saturated is False and isinstance(sampler.preconditioner, MarginalMixtureMap)
    draws = sampler.draw(2000)
    est = draws.evidence()
    assert est.ess_per_draw < 0.05  # a poor proposal (truth 0: wherever log Z lands, it is luck) ...
    with pytest.warns(RuntimeWarning, match="under-represent"):
        check = sampler.check_modes(draws)
        warn_lost_modes(check, sampler.config.objective, "Chain 0: ")
    assert len(check.lost) > len(sampler.modes) // 2  # ... flagged by the modes it misses, whatever k-hat says
