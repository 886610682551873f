# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.diagnostics: weighted summaries, diagnostics and resampling of a fitted runner's draws."""

import math

import pytest
import torch

from pyro_osds.diagnostics import resample_indices
from tests.common import fitted, fitted_module_osds


@pytest.fixture(scope="module")
def osds():
    return fitted_module_osds()


def test_summary_and_diagnostics(osds, capsys):
    osds.summary(prob=0.8)
    out = capsys.readouterr().out
    for column in ("mean", "std", "median", "10.0%", "90.0%", "n_eff", "r_hat", "x[2]", "log Z ="):
        assert column in out
    diag = osds.diagnostics()
    assert set(diag["x"]) == {"n_eff", "r_hat"} and diag["x"]["r_hat"].shape == (3,)
    assert set(diag["log_evidence"]) == {"chain 0", "chain 1"}
    with pytest.raises(ValueError, match="prob"):
        osds.summary_dict(prob=1.5)


def test_weighted_summary_uses_the_weights(osds):
    stats = osds.summary_dict()
    x = osds.get_samples(resample=False)["x"]
    w = osds.get_normalized_weights()
    torch.testing.assert_close(stats["x"]["mean"], (w[:, None] * x).sum(0))


def test_resampling_follows_the_weights():
    # a deliberately poor sampler (no training, identity preconditioner): resampling must move the draws
    osds = fitted(num_iterations=0, precondition="none", num_samples=2000)
    raw = osds.get_samples(resample=False)["x"].mean(0)
    with pytest.warns(RuntimeWarning, match="effective samples"):
        resampled = osds.get_samples()["x"].mean(0)
    weighted = osds.summary_dict()["x"]["mean"]
    assert float((resampled - weighted).abs().max()) < float((raw - weighted).abs().max())


def test_systematic_resampling_keeps_each_draw_floor_or_ceil_of_its_expected_count():
    g = torch.Generator().manual_seed(0)
    log_w = torch.randn(3, 500, dtype=torch.float64, generator=g) * 2.0
    idx = resample_indices(log_w, generator=torch.Generator().manual_seed(1))
    assert idx.shape == (3, 500) and bool((idx[:, 1:] >= idx[:, :-1]).all())  # copies adjacent
    expected = 500 * torch.softmax(log_w, -1)
    counts = torch.zeros(3, 500, dtype=torch.float64).scatter_add_(1, idx, torch.ones(3, 500, dtype=torch.float64))
    assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all())
    # the same stream gives the same indices; M != N works
    assert torch.equal(idx, resample_indices(log_w, generator=torch.Generator().manual_seed(1)))
    assert resample_indices(log_w, 7).shape == (3, 7)


def test_systematic_resampling_is_unbiased():
    # E[count_i] = M w_i over the uniform: the average count over many streams matches to Monte Carlo error
    log_w = torch.log(torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64))
    g = torch.Generator().manual_seed(2)
    counts = torch.stack([torch.bincount(resample_indices(log_w, 3, generator=g), minlength=4) for _ in range(4000)])
    mean = counts.double().mean(0)
    se = counts.double().std(0) / math.sqrt(4000)
    assert bool(((mean - 3 * log_w.exp()).abs() <= 4 * se + 1e-12).all()), mean
