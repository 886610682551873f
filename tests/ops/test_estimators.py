# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.estimators: log-evidence estimates, ESS, Pareto k-hat, pooled chains."""

import math

import pytest
import torch

from pyro_osds.ops.estimators import (
    EvidenceError,
    evidence,
    forward_evidence,
    kish_ess,
    log_mean_exp,
    pareto_k_hat,
    pool_estimates,
)
from tests.common import D64


def test_equal_weights():
    est = evidence(torch.full((100,), -3.5, dtype=D64))
    assert est.log_z == pytest.approx(-3.5, abs=1e-12)
    assert est.elbo == pytest.approx(-3.5, abs=1e-12)
    assert est.ess == pytest.approx(100.0)
    assert est.ess_per_draw == pytest.approx(1.0)
    assert est.se == pytest.approx(0.0, abs=1e-7)


def test_shift_invariance_and_large_magnitudes():
    lw = torch.randn(1000, dtype=D64) * 2
    base = evidence(lw)
    for shift in [-1e6, -50.0, 1e5]:
        est = evidence(lw + shift)
        assert est.log_z == pytest.approx(base.log_z + shift, abs=1e-9 * max(1.0, abs(shift)))
        assert est.se == pytest.approx(base.se, rel=1e-9)
        assert est.ess == pytest.approx(base.ess, rel=1e-9)
        assert est.k_hat == pytest.approx(base.k_hat, rel=1e-6)
        assert math.isfinite(est.log_z)


def test_ess_bounds():
    for scale in [0.0, 0.1, 1.0, 10.0, 1000.0]:
        lw = torch.randn(500, dtype=D64) * scale
        ess = float(kish_ess(lw))
        assert 1.0 - 1e-9 <= ess <= 500.0 + 1e-9


def test_lognormal_weights_statistically():
    # log w ~ N(mu, s^2): Z = exp(mu + s^2/2), so log Z = mu + s^2/2; ELBO = mu
    mu, s, n = -2.0, 0.8, 20_000
    lw = mu + s * torch.randn(n, dtype=D64)
    est = evidence(lw)
    assert abs(est.log_z - (mu + s**2 / 2)) < 4 * est.se
    assert abs(est.elbo - mu) < 4 * est.elbo_se
    # SE from the delta method agrees with the analytic one: Var(w)/E[w]^2 = exp(s^2) - 1
    assert est.se == pytest.approx(math.sqrt((math.exp(s**2) - 1) / n), rel=0.1)


def test_log_mean_exp_with_minus_infinity():
    lw = torch.tensor([0.0, -math.inf, math.log(3.0)], dtype=D64)
    assert float(log_mean_exp(lw)) == pytest.approx(math.log(4.0 / 3.0))
    est = evidence(lw)  # -inf is a valid (zero) weight
    assert est.num_draws == 3 and est.num_nonfinite == 0
    assert est.elbo == -math.inf


def test_nan_weights_are_excluded_with_a_warning_and_all_invalid_raises():
    lw = torch.tensor([0.0, math.nan, 1.0, math.inf], dtype=D64)
    with pytest.warns(RuntimeWarning, match="2 of 4 log-weights are NaN or \\+inf"):
        est = evidence(lw)
    assert est.num_draws == 2 and est.num_nonfinite == 2
    assert math.isfinite(est.log_z)
    with pytest.raises(EvidenceError, match="No finite log-weights"):
        evidence(torch.tensor([-math.inf, -math.inf], dtype=D64))
    with pytest.raises(EvidenceError), pytest.warns(RuntimeWarning):
        evidence(torch.tensor([math.nan], dtype=D64))


@pytest.mark.parametrize("df", [2.5, 10.0])
def test_k_hat_matches_arviz(df):
    az = pytest.importorskip("arviz")
    lw = torch.log(torch.distributions.Pareto(torch.tensor(1.0, dtype=D64), torch.tensor(df, dtype=D64)).sample((3000,)))
    _, ref_k = az.psislw(lw.numpy().copy(), reff=1.0)
    k = pareto_k_hat(lw)
    assert k == pytest.approx(float(ref_k), abs=1e-8)
    # the tail index of a Pareto(alpha) weight is 1/alpha; the fit uses the M = 165 largest weights,
    # with standard error about (1 + k) / sqrt(M)
    assert k == pytest.approx(1 / df, abs=3 * (1 + 1 / df) / math.sqrt(165))


def test_k_hat_edge_cases():
    assert math.isnan(pareto_k_hat(torch.randn(10, dtype=D64)))
    assert pareto_k_hat(torch.zeros(100, dtype=D64)) == -math.inf


def test_forward_estimates():
    # forward log-weights at target draws: log w = log Z + log(pi/q); with q = pi exactly, all equal log Z
    est = forward_evidence(torch.full((50,), 1.25, dtype=D64))
    assert est.eubo == pytest.approx(1.25) and est.log_z == pytest.approx(1.25)
    lw = 0.3 + 0.5 * torch.randn(20_000, dtype=D64)
    est = forward_evidence(lw)
    # E_pi[1/w] = exp(-mu + s^2/2) for log w ~ N(mu, s^2): forward log Z = mu - s^2/2
    assert abs(est.log_z - (0.3 - 0.125)) < 4 * est.se
    assert est.eubo == pytest.approx(0.3, abs=4 * est.eubo_se)


def test_pooled_chains():
    a, b = torch.randn(300, dtype=D64), torch.randn(300, dtype=D64) + 0.1
    pooled = pool_estimates([a, b], num_folded=3)
    assert pooled.num_draws == 600 and pooled.num_folded == 3
    assert pooled.log_z == pytest.approx(float(log_mean_exp(torch.cat([a, b]))))
    assert pooled.k_hat == pytest.approx(max(pareto_k_hat(a), pareto_k_hat(b)))


def test_pooled_k_hat_is_the_worst_chain_not_a_fit_to_the_union():
    # the verdict follows the heaviest chain: a fit to the union dilutes one chain's heavy tail with the other's
    # draws and let misses through on the calibration targets (pool_estimates' docstring has the measurement)
    a = torch.linspace(-3.0, 0.0, 2000, dtype=D64)
    b = torch.linspace(-3.5, -0.8, 2000, dtype=D64)
    pooled = pool_estimates([a, b])
    assert pooled.k_hat == pytest.approx(max(pareto_k_hat(a), pareto_k_hat(b))) and pooled.k_hat < 0


def _gaussian_ratio_log_weights(n, target_var, dim, generator):
    """Log-weights of N(0, I) draws for the normalised target N(0, target_var I) (log Z = 0): tail index
    1 - 1/target_var, so target_var 2.5 gives k = 0.6 (infinite variance) and 1.3 gives k = 0.23."""
    x = torch.randn(n, dim, generator=generator, dtype=D64)
    return (-0.5 * x**2 * (1 / target_var - 1) - 0.5 * math.log(target_var)).sum(1)


def test_a_reference_widens_the_se_by_its_variance_and_fits_the_tail_to_the_union():
    g = torch.Generator().manual_seed(0)
    light = torch.randn(500, generator=g, dtype=D64) * 0.1
    heavy = _gaussian_ratio_log_weights(4000, 2.5, 1, g)
    est = evidence(light, reference=heavy)
    alone = evidence(light)
    union = torch.cat([light, heavy])
    union_rel_var = (union.numel() / float(kish_ess(union)) - 1) * union.numel() / (union.numel() - 1)
    assert est.se == pytest.approx(math.sqrt(union_rel_var / 500), rel=1e-12) and est.se > alone.se
    assert est.k_hat == pareto_k_hat(union) and est.k_hat > alone.k_hat
    assert (est.log_z, est.ess, est.elbo, est.num_draws) == (alone.log_z, alone.ess, alone.elbo, alone.num_draws)
    # a reference with a lighter spread never shrinks the draws' own SE; NaN in the reference are dropped
    quiet = evidence(heavy[:500], reference=torch.cat([light, torch.tensor([math.nan], dtype=D64)]))
    assert quiet.se == evidence(heavy[:500]).se
    pooled = pool_estimates([light, heavy[:500]], references=[heavy[500:], None])
    assert pooled.k_hat == pytest.approx(max(pareto_k_hat(torch.cat([light, heavy[500:]])), pareto_k_hat(heavy[:500])))


def test_with_a_reference_a_missed_heavy_tail_no_longer_gives_a_confident_wrong_estimate():
    # k = 0.6: sets of 2000 that miss the tail come out low with a small SE of their own; the SE read from 16384 more
    # draws of the same proposal keeps them within 3 SE (measured: 8 of 200 beyond 3 SE alone, none with the reference)
    g = torch.Generator().manual_seed(0)
    z_alone, z_ref = [], []
    for _ in range(200):
        log_w, ref = _gaussian_ratio_log_weights(2000, 2.5, 1, g), _gaussian_ratio_log_weights(16384, 2.5, 1, g)
        alone, with_ref = evidence(log_w), evidence(log_w, reference=ref)
        z_alone.append(alone.log_z / alone.se)
        z_ref.append(with_ref.log_z / with_ref.se)
    assert sum(abs(z) > 3 for z in z_alone) >= 4 and sum(abs(z) > 3 for z in z_ref) <= 1


def test_with_a_reference_a_light_tail_is_no_longer_flagged_by_chance():
    # k = 0.23 in 8 dimensions: the tail fit of 2000 draws crosses 0.5 by chance (7 of 200 sets); of 18384 it does not
    g = torch.Generator().manual_seed(0)
    flagged_alone = flagged_ref = 0
    for _ in range(200):
        log_w, ref = _gaussian_ratio_log_weights(2000, 1.3, 8, g), _gaussian_ratio_log_weights(16384, 1.3, 8, g)
        flagged_alone += not evidence(log_w).tail_ok
        flagged_ref += not evidence(log_w, reference=ref).tail_ok
    assert flagged_alone >= 3 and flagged_ref == 0
