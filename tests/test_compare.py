# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.compare: model comparison by log evidence."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS, compare
from pyro_osds.ops.estimators import Estimates
from tests.common import D64, Z


def normal_mean_model(y, prior_scale):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), prior_scale))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


def exact_log_z(y, prior_scale):
    n = y.shape[0]
    cov = torch.eye(n, dtype=D64) + prior_scale**2 * torch.ones(n, n, dtype=D64)
    return float(torch.distributions.MultivariateNormal(torch.zeros(n, dtype=D64), cov).log_prob(y))


def test_compare_ranks_models_with_known_bayes_factors():
    g = torch.Generator().manual_seed(0)
    y = 0.8 + torch.randn(15, dtype=D64, generator=g)
    scales = {"tight": 1.0, "wide": 10.0, "very_wide": 100.0}
    fitted = {}
    for name, s in scales.items():
        fitted[name] = OSDS(lambda y, s=s: normal_mean_model(y, s), num_samples=2000, preset="smoke").run(y)
    table = compare(fitted)
    truth = {name: exact_log_z(y, s) for name, s in scales.items()}
    assert list(table.index) == sorted(truth, key=truth.get, reverse=True)
    best = table.index[0]
    for name in table.index:
        expected_bf = truth[name] - truth[best]
        se = table.loc[name, "log_bf_se"]
        assert abs(table.loc[name, "log_bf"] - expected_bf) <= Z * se + se**2 + 1e-9
    assert table["weight"].sum() == pytest.approx(1.0) and list(table["rank"]) == [0, 1, 2]
    assert table.loc[best, "log_bf"] == 0.0 and table.loc[best, "log_bf_se"] == 0.0
    assert bool(table["reliable"].all())


def test_compare_warns_about_unreliable_estimates():
    good = Estimates(-10.0, 0.01, -10.1, 0.01, 900.0, 0.9, 0.2, 1000)
    bad = Estimates(-9.0, 0.5, -14.0, 0.3, 3.0, 0.003, 1.3, 1000)
    with pytest.warns(UserWarning, match=r"Unreliable log-evidence estimate\(s\) \(bad: k_hat=1.30, ESS=3\)"):
        table = compare({"good": good, "bad": bad})
    assert list(table.index) == ["bad", "good"]
    assert not table.loc["bad", "reliable"] and table.loc["good", "reliable"]
    assert table.loc["good", "log_bf"] == pytest.approx(-1.0)
    assert table.loc["good", "log_bf_se"] == pytest.approx(math.sqrt(0.01**2 + 0.5**2))
    assert table.loc["bad", "weight"] == pytest.approx(math.e / (1 + math.e))
    assert table.loc["bad", "warning"] and not table.loc["good", "warning"]
    assert list(table.columns[:6]) == ["rank", "log_z", "se", "log_bf", "log_bf_se", "weight"]


def test_prior_model_probabilities_weight_the_bayes_factors():
    a = Estimates(-10.0, 0.01, -10.1, 0.01, 900.0, 0.9, 0.2, 1000)
    b = Estimates(-11.0, 0.01, -11.1, 0.01, 900.0, 0.9, 0.2, 1000)
    table = compare({"a": a, "b": b}, prior_probs={"a": 1.0, "b": 3.0})  # normalised: 1/4 and 3/4
    # P(a | y) = Z_a / 4 / (Z_a / 4 + 3 Z_b / 4) = e / (e + 3)
    assert table.loc["a", "weight"] == pytest.approx(math.e / (math.e + 3))
    assert table.loc["a", "log_bf"] == 0.0  # the Bayes factor itself does not depend on the prior odds
    with pytest.raises(ValueError, match="positive probability to each model"):
        compare({"a": a, "b": b}, prior_probs={"a": 1.0})
    with pytest.raises(ValueError, match="positive probability"):
        compare({"a": a, "b": b}, prior_probs={"a": 1.0, "b": 0.0})


def test_folded_draws_make_an_estimate_unreliable():
    good = Estimates(-10.0, 0.01, -10.1, 0.01, 900.0, 0.9, 0.2, 1000)
    folded = Estimates(-10.5, 0.01, -10.6, 0.01, 900.0, 0.9, 0.2, 1000, num_folded=12)
    with pytest.warns(UserWarning, match="folded: .*12 folded draws"):
        table = compare({"good": good, "folded": folded})
    assert table.loc["folded", "folded"] == 12 and not table.loc["folded", "reliable"]


def test_compare_refuses_an_approximate_volume():
    good = Estimates(-10.0, 0.01, -10.1, 0.01, 900.0, 0.9, 0.2, 1000)
    hutchinson = Estimates(154.4, 0.03, 150.0, 0.03, 400.0, 0.4, 0.48, 1000, log_det="hutchinson")
    assert not hutchinson.exact and not hutchinson.reliable and good.exact
    with pytest.raises(ValueError, match="'approx' comes from the approximate 'hutchinson' log-det.*log_det='exact'"):
        compare({"good": good, "approx": hutchinson})
    em_path = Estimates(-10.2, 0.02, -10.4, 0.02, 500.0, 0.5, 0.3, 1000, log_det="em_path")  # exact path weights
    assert bool(compare({"good": good, "em": em_path})["reliable"].all())


def test_compare_input_validation():
    with pytest.raises(ValueError, match="non-empty dict"):
        compare({})
    with pytest.raises(TypeError, match="'x' must be a fitted OSDS"):
        compare({"x": 1.0})
