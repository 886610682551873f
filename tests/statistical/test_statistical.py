# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Statistical tests of the engine against exact answers, with fixed seeds and tolerances derived from
the reported standard errors.

Tolerance policy: each assertion allows Z = 4.5 standard errors (a two-sided Gaussian false-alarm
rate of 7e-6 per assertion) plus, for log Z, the downward log-mean-exp bias of about SE^2 / 2.
Assertions on log Z are only meaningful when the weights have a finite variance, so every test
first requires Pareto k-hat < 0.7.
"""

import math

import pyro
import pytest
import torch

from pyro_osds import OSDS
from pyro_osds.config import OSDSConfig
from pyro_osds.samplers import FlowSampler
from tests.common import D64, Z, mixture_potential, within

# ------------------------------------------------------------------------------------------------
# a correlated, anisotropic, shifted 5-D Gaussian; only a *diagonal* preconditioner, so the flow
# itself has to learn the correlations
_gen = torch.Generator().manual_seed(0)
_A = torch.randn(5, 5, generator=_gen, dtype=D64)
COV = _A @ _A.T / 5 + 0.3 * torch.eye(5, dtype=D64)
MEAN = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=D64)
PREC = torch.linalg.inv(COV)
OFFSET = 1.0
LOG_Z = 0.5 * 5 * math.log(2 * math.pi) + 0.5 * float(torch.logdet(COV)) - OFFSET


def gaussian_potential(x):
    r = x - MEAN
    return 0.5 * ((r @ PREC) * r).sum(-1) + OFFSET


@pytest.fixture(scope="module", params=["cpu", "paper-cpu"])
def gaussian_sampler(request):
    """Both training objectives: the one-step objective (default) and the paper's (EM + distillation)."""
    with torch.random.fork_rng():
        pyro.set_rng_seed(0)
        config = OSDSConfig.preset(request.param, num_iterations=600, grid_size=16, sd_warmup=60,
                                   precondition="diagonal_laplace", dtype=None, flow_kl_steps=(1, 2, 4))
        sampler = FlowSampler(gaussian_potential, torch.zeros(5, dtype=D64), config, disable_progbar=True)
        sampler.fit()
    return sampler


def test_one_step_deterministic_flow_evidence(gaussian_sampler):
    est = gaussian_sampler.evidence(8000, num_steps=1)
    assert est.reliable and est.num_folded == 0
    assert within(est.log_z, LOG_Z, est.se, bias=0.5 * est.se**2), est


def test_one_step_posterior_moments(gaussian_sampler):
    draws = gaussian_sampler.draw(8000, num_steps=1)
    w = torch.softmax(draws.log_weight, 0)
    ess = float(1.0 / (w**2).sum())
    mean = (w[:, None] * draws.x).sum(0)
    sd = ((w[:, None] * (draws.x - mean) ** 2).sum(0)).sqrt()
    true_sd = COV.diagonal().sqrt()
    assert bool(((mean - MEAN).abs() <= Z * true_sd / math.sqrt(ess)).all()), (mean, ess)
    # for a Gaussian, SE(sd) / sd is about 1 / sqrt(2 ESS)
    assert bool(((sd / true_sd - 1).abs() <= Z / math.sqrt(2 * ess)).all()), (sd, ess)


def test_one_step_em_weights_are_far_worse_than_deterministic_flow_weights(gaussian_sampler):
    # the paper's claim: EM path weights collapse at few steps, the deterministic-flow weights do not
    df = gaussian_sampler.evidence(4000, num_steps=1)
    em = gaussian_sampler.em_evidence(4000, num_steps=1)
    assert em.elbo < df.elbo - 1.0
    assert em.ess < df.ess / 10
    assert abs(em.log_z - LOG_Z) > abs(df.log_z - LOG_Z)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 16])
def test_elbo_is_a_lower_bound(gaussian_sampler, num_steps):
    # 16000 draws: with near-constant weights (ESS/N 0.9998) k-hat from 4000 draws is biased up and noisy
    # (measured for the path-gradient map at K = 2: 4 of 32 blocks of 4000 above 0.7, none of 8 blocks of
    # 16000, 0.35 from 128000)
    est = gaussian_sampler.evidence(16000, num_steps=num_steps)
    # exact weights: a lower bound at every step count, trained or not
    assert est.elbo <= LOG_Z + Z * est.elbo_se, est
    config = gaussian_sampler.config
    if config.objective.diffusion.weight > 0 or num_steps in config.objective.flow_kl.steps:  # a trained step count
        # usable (k-hat <= 0.7, or weights so near constant that k-hat is noise) and within its SE; `reliable` asks
        # for k-hat <= 0.5 (finite variance), which the briefly trained paper-objective map at K = 1 (ESS/N 0.02,
        # k-hat 0.66) does not meet, so it is flagged although this estimate happens to be within its SE
        assert est.k_hat <= 0.7 or est.ess_per_draw >= 0.99, est
        assert est.reliable == (est.k_hat <= 0.5 or est.ess_per_draw >= 0.99), est
        assert within(est.log_z, LOG_Z, est.se, bias=0.5 * est.se**2), est


def test_the_authors_weight_is_not_a_bound_but_ours_is(gaussian_sampler):
    # the OSDS code's Euler-Hutchinson weight (g held constant) is an approximation; it is no longer the
    # density of the map, so its "ELBO" is not guaranteed below log Z, unlike the exact one
    exact = gaussian_sampler.evidence(4000, num_steps=1)
    euler = gaussian_sampler.evidence(4000, num_steps=1, log_det="hutchinson")
    assert euler.log_det == "hutchinson" and exact.log_det == "exact"
    assert abs(euler.elbo - exact.elbo) > 4 * (euler.elbo_se + exact.elbo_se)


# ------------------------------------------------------------------------------------------------
# slower: a two-component mixture and a skewed (rotated log-Gamma) target
@pytest.mark.slow
def test_two_component_mixture_recovers_both_mode_weights():
    # Both objectives together: the paper's diffusion loss keeps both modes (the exact reverse KL of the
    # flow alone is mode-seeking and, without it, drops the lighter mode). At this budget the maps of
    # K < 8 steps still fold between the modes (counted, and their log Z then flagged), so the claim
    # tested here is at K = 8 and 16. PSIS k-hat is not required below 0.7: about 4 in 8000 draws carry
    # weights 2-3 times the 99.9% quantile (a small under-covered region), which PSIS reports, while
    # the tail mass is too small to move the estimates. With k-hat that high the ESS is set by a few
    # draws and moves with any change of the training path (0.72 at K = 8 before the fold penalty,
    # 0.29 with it, 0.35 / 0.17 with fold_weight=10 at seeds 0 / 1), so only a floor is asserted.
    pyro.set_rng_seed(0)
    config = OSDSConfig.preset("paper-cpu", num_iterations=600, grid_size=16, sd_warmup=60, precondition="none",
                               prior_scale=2.0, flow_kl_weight=1.0, flow_kl_steps=(1, 2, 4), dtype=None)
    sampler = FlowSampler(mixture_potential, torch.zeros(2, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    for num_steps in (8, 16):
        draws = sampler.draw(8000, num_steps)
        w = torch.softmax(draws.log_weight, 0)
        ess = float(1.0 / (w**2).sum())
        left = float((w * (draws.x[:, 0] < 0)).sum())
        assert abs(left - 0.3) <= Z * math.sqrt(0.3 * 0.7 / ess), (num_steps, left, ess)
        est = sampler.evidence(8000, num_steps)
        assert est.num_folded == 0 and est.ess_per_draw > 0.2
        assert within(est.log_z, 0.0, est.se, bias=0.5 * est.se**2), est


_Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=D64))
_SHAPES = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.8], dtype=D64)


def log_gamma_potential(x):
    # z_i = log G_i with G_i ~ Gamma(a_i, 1), rotated and shifted: skewed, correlated, normalised (times e^-2)
    z = (x - 0.3) @ _Q
    return -(_SHAPES * z - z.exp() - torch.lgamma(_SHAPES)).sum(-1) + 2.0


@pytest.mark.slow
def test_skewed_target_one_step_evidence_and_honest_fold_reports():
    pyro.set_rng_seed(0)
    config = OSDSConfig(num_iterations=300, grid_size=16, mode_search_starts=0, dtype=None)
    sampler = FlowSampler(log_gamma_potential, torch.zeros(5, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    est = sampler.evidence(8000, num_steps=1)
    # No k-hat < 0.7 requirement: log-Gamma coordinates have exponential left tails, heavier than the
    # sampler's, so the weights' variance diverges in the far tail (as PSIS may say); that tail holds
    # negligible mass.
    assert est.num_folded == 0 and est.ess_per_draw > 0.5
    assert within(est.log_z, -2.0, est.se, bias=0.5 * est.se**2), est
    assert est.elbo <= -2.0 + Z * est.elbo_se
    # The two-step map overshoots in the stiff right tail (score a - e^z) and folds there; its weights
    # are then not exact. That must be reported, never hidden.
    two = sampler.evidence(8000, num_steps=2)
    assert two.num_folded > 0
    from pyro_osds import compare

    with pytest.warns(UserWarning, match="folded draws"):
        table = compare({"one_step": est, "two_steps": two})
    assert not table.loc["two_steps", "reliable"] and table.loc["two_steps", "folded"] > 0
    # the one-step estimate has no folds; the table's verdict is the estimate's own (the path-gradient map has
    # k-hat 0.72 from these 8000 draws, 0.68 from 64000, but ESS/N 0.996: weights this near constant make k-hat
    # noise, and the log Z error is 5e-4 +- 7e-4)
    assert table.loc["one_step", "folded"] == 0
    assert bool(table.loc["one_step", "reliable"]) == est.reliable


_GRID = torch.tensor([-5.0, 0.0, 5.0], dtype=D64)
_NINE_MODES = torch.cartesian_prod(_GRID, _GRID)


def nine_mode_potential(x):
    # the SCDS paper's 2-D mixture of 9 equal-weight N(mu_k, 0.3 I) on the grid {-5, 0, 5}^2; log Z = 0
    comp = torch.distributions.Normal(_NINE_MODES.to(x.dtype), math.sqrt(0.3)).log_prob(x[:, None, :]).sum(-1)
    return -(torch.logsumexp(comp, -1) - math.log(9.0))


def test_one_step_map_does_not_fold_to_overstate_the_evidence():
    # The default objective's reverse KL can be lowered by folding the map (log|det| then understates
    # the density of the draws, so the weights overstate Z). Without the fold penalty (fold_weight=0)
    # this run folds 37% of its draws and reports log Z = 0.91 +- 0.05 against the true 0; with it,
    # no draw folds and the estimate is honest: not above the truth beyond its standard error
    # (missing modes can only make it low).
    pyro.set_rng_seed(0)
    sampler = FlowSampler(nine_mode_potential, torch.zeros(2, dtype=D64), OSDSConfig(),
                          generator=torch.Generator().manual_seed(0), disable_progbar=True)
    with pytest.warns(UserWarning, match="separated modes"):
        sampler.fit_preconditioner()
    sampler.fit()
    est = sampler.evidence(8000, num_steps=1)
    assert est.num_folded <= 0.001 * 8000, est
    assert est.log_z <= 0.0 + Z * est.se, est
    assert est.elbo <= 0.0 + Z * est.elbo_se, est


@pytest.mark.parametrize("num_components", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_label_switching_mixture_model_evidence_against_enumeration(num_components):
    """A Pyro mixture model with K! symmetric posterior modes: every chain gets a component per mode, and
    log Z matches the exact value from enumerating all assignments."""
    from benchmarks.targets import get_target

    target = get_target(f"mixture_model_k{num_components}")
    pyro.set_rng_seed(0)
    osds = OSDS(target.model, num_samples=2000, disable_progbar=True).run(*target.model_args)
    ev = osds.log_evidence()
    assert len(ev.components) == 2 * math.factorial(num_components) and ev.reliable, ev
    assert within(ev.log_z, target.log_z, ev.se, bias=0.5 * ev.se**2), ev
    # the modes' weights: 1/K! each, up to Monte Carlo error
    locs = osds.get_samples(resample=False)["locs"]
    w = osds.get_normalized_weights()
    nearest = torch.cdist(locs, target.modes).argmin(-1)
    shares = torch.zeros(len(target.modes), dtype=D64).index_add_(0, nearest, w)
    assert bool(((shares - target.mode_weights).abs() <= Z * (target.mode_weights / ev.ess).sqrt()).all()), shares


def test_skewed_positive_parameters_evidence_with_fitted_tails():
    """A plated Gamma-Poisson model (a user's count model): each rate's posterior is Gamma(a + y_i, b + 1), skewed
    on the log scale Pyro samples in (an exponential left tail). With fitted tails the preconditioner alone is within
    a few hundredths of a nat of log Z, the weights are reliable and log Z and the rates' posterior means match the
    exact ones (negative-binomial marginals)."""
    import pyro.distributions as dist

    a, b = 2.0, 1.0
    y = torch.tensor([0, 0, 1, 0, 3, 1, 2, 0, 5, 1, 0, 2, 1, 0, 0, 4], dtype=D64)
    log_z = float((torch.lgamma(y + a) - math.lgamma(a) - torch.lgamma(y + 1) + a * math.log(b / (b + 1))
                   - y * math.log(b + 1)).sum())

    def model(y):
        with pyro.plate("counts", y.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(torch.tensor(a, dtype=D64), b))
            pyro.sample("y", dist.Poisson(rate), obs=y)

    pyro.set_rng_seed(0)
    osds = OSDS(model, num_samples=4000, num_chains=1, num_iterations=200, precondition_tails=True,
                disable_progbar=True).run(y)
    ev = osds.log_evidence()
    # the preconditioner's own ELBO (its fit's report): the Gaussian 0.49 nats below log Z, the tails 0.03
    fit = osds.samplers[0].report.fit["tails"]
    assert log_z - fit["tails_elbo"] < 0.1 < 0.3 < log_z - fit["gaussian_elbo"], fit
    # and the trained map's weights (without the tails, after the same training: ESS/N 0.94, k-hat 0.40)
    assert ev.reliable and ev.ess_per_draw > 0.97, ev
    assert within(ev.log_z, log_z, ev.se, bias=0.5 * ev.se**2), (ev, log_z)
    rate = osds.get_samples(resample=False)["rate"]
    w = osds.get_normalized_weights()
    mean, exact = (w[:, None] * rate).sum(0), (y + a) / (b + 1)
    sd = ((w[:, None] * (rate - mean) ** 2).sum(0) / ev.ess).sqrt()
    assert bool(((mean - exact).abs() <= Z * sd).all()), (mean, exact)


def test_funnel_evidence_and_neck_with_automatic_noncentring():
    """Neal's funnel in 10-D (log Z = 0, x0 ~ N(0, 3^2)): the default parameterisation choice non-centres the
    nine scaled coordinates, after which the weights are reliable, log Z is right and the neck's scale is
    recovered (the sd of x0 within 5 %). As written (``noncentering="none"``) the same training is flagged, k-hat
    about 0.7, and 0.1 nats low (``benchmarks/results/calibration``)."""
    from benchmarks.targets import get_target

    target = get_target("funnel10")
    pyro.set_rng_seed(0)
    osds = OSDS(target.model, num_samples=4000, num_chains=1, num_iterations=200, disable_progbar=True).run()
    assert osds.target.noncentered_sites == ("xs",)
    ev = osds.log_evidence()
    assert ev.reliable and ev.ess_per_draw > 0.9, ev
    assert within(ev.log_z, 0.0, ev.se, bias=0.5 * ev.se**2), ev
    x0 = osds.get_samples(resample=False)["x0"]
    w = osds.get_normalized_weights()
    mean = (w * x0).sum()
    sd = (w * (x0 - mean) ** 2).sum().sqrt()
    assert abs(float(sd) / 3.0 - 1.0) < 0.05, sd
