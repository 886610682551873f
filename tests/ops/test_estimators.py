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
