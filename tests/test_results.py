# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.results: one chain's Draws and a run's pooled LogEvidence."""

import math

import pytest
import torch

from pyro_osds.ops.estimators import Estimates, EvidenceError, evidence, pool_estimates
from pyro_osds.results import Draws, LogEvidence
from tests.common import D64


def _draws(log_w, orientation=None, log_det="exact"):
    n = log_w.numel()
    return Draws(torch.zeros(n, 2, dtype=D64), -log_w, torch.zeros(n, dtype=D64), log_w, orientation, log_det)


def test_log_evidence_pools_chains_and_reads_like_its_pooled_estimates():
    a, b = torch.randn(400, dtype=D64), 0.2 + torch.randn(400, dtype=D64)
    folded = torch.ones(400, dtype=D64)
    folded[:3] = -1.0
    ev = LogEvidence.from_draws([_draws(a, folded), _draws(b)], num_steps=2)
    assert ev.pooled == pool_estimates([a, b], num_folded=3)
    assert ev.chains == (evidence(a, num_folded=3), evidence(b)) and ev.num_steps == 2
    for field in Estimates._fields:  # every estimate field reads through
        assert getattr(ev, field) == getattr(ev.pooled, field) or math.isnan(getattr(ev, field))
    assert ev.num_folded == 3 and {"log_z", "se", "k_hat"} <= set(dir(ev))
    text = str(ev)
    assert "2-step flow" in text and "folds at 3 draws" in text and "chain 1: log Z" in text
    with pytest.raises(AttributeError):
        ev.no_such_field  # noqa: B018


def test_an_approximate_volume_is_never_reliable():
    lw = torch.randn(400, dtype=D64, generator=torch.Generator().manual_seed(0)) * 0.01
    exact = LogEvidence.from_draws([_draws(lw)], 1)
    approximate = LogEvidence.from_draws([_draws(lw, log_det="hutchinson")], 1)
    assert exact.exact and exact.reliable and "approximation" not in str(exact)
    assert not approximate.exact and not approximate.reliable and approximate.log_z == exact.log_z
    assert "'hutchinson' log-det is an approximation" in str(approximate)


def test_draws_without_a_volume_carry_no_evidence():
    draws = _draws(torch.full((30,), math.nan, dtype=D64), log_det="none")
    assert draws.folded is None and draws.num_folded == 0
    with pytest.raises(EvidenceError, match="carry no importance weights"):
        draws.evidence()


def test_mixture_components_are_listed_with_their_shares_and_lost_modes_make_it_unreliable():
    lw = torch.zeros(6, dtype=D64)
    lw[3:] = math.log(3.0)  # component 1's draws carry three times the weight
    draws = Draws(torch.zeros(6, 2, dtype=D64), -lw, torch.zeros(6, dtype=D64), lw, None, "exact",
                  component=torch.tensor([0, 0, 0, 1, 1, 1]))
    locations = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=D64)
    ev = LogEvidence.from_draws([draws], 1, mixtures=[(locations, [0.4, 0.6])])
    assert [(c.component, c.weight, c.num_draws) for c in ev.components] == [(0, 0.4, 3), (1, 0.6, 3)]
    assert [c.share for c in ev.components] == pytest.approx([0.25, 0.75])
    assert torch.equal(ev.components[1].location, locations[1]) and "component 1 at (1, 0)" in str(ev)
    lost = LogEvidence.from_draws([draws], 1, num_lost_modes=2)
    assert lost.pooled.reliable and not lost.reliable and "2 mode(s)" in str(lost)
    unenumerated = LogEvidence.from_draws([draws], 1, too_many_modes=True)
    assert unenumerated.pooled.reliable and not unenumerated.reliable
    assert "more separated modes than it could enumerate" in str(unenumerated)
