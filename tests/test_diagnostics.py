# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.diagnostics: weighted summaries, diagnostics and resampling of a fitted runner's draws."""

import pytest
import torch

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
    assert diag["divergences"] == {"chain 0": [], "chain 1": []}
    assert set(diag["log_evidence"]) == {"chain 0", "chain 1"}
    with pytest.raises(ValueError, match="prob"):
        osds.summary_dict(prob=1.5)


def test_weighted_summary_uses_the_weights(osds):
    stats = osds.summary_dict()
    x = osds.get_samples()["x"]
    w = osds.get_normalized_weights()
    torch.testing.assert_close(stats["x"]["mean"], (w[:, None] * x).sum(0))


def test_resampling_follows_the_weights():
    # a deliberately poor sampler (no training, identity preconditioner): resampling must move the draws
    osds = fitted(num_iterations=0, precondition="none", num_samples=2000)
    raw = osds.get_samples()["x"].mean(0)
    with pytest.warns(RuntimeWarning, match="effective samples"):
        resampled = osds.get_samples(resample=True)["x"].mean(0)
    weighted = osds.summary_dict()["x"]["mean"]
    assert float((resampled - weighted).abs().max()) < float((raw - weighted).abs().max())
