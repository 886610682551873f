# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.checks: a set of draws is checked once into a DrawReport that the warnings, the evidence and
reloaded runners read."""

import pyro
import pytest
import torch

from pyro_osds import OSDS, EvidenceError
from pyro_osds.checks import check_draws
from pyro_osds.config import OSDSConfig
from pyro_osds.ops.estimators import pareto_k_hat
from pyro_osds.samplers import build_sampler
from tests.common import D64, batched, gaussian_mixture_potential, make


def test_a_report_holds_each_chains_mode_check_and_the_evidence_of_all_draws():
    potential = gaussian_mixture_potential([[-4.0, 0.0], [4.0, 0.0]], [0.3, 0.7], scale=0.7)
    chains = [build_sampler(potential, torch.zeros(2, dtype=D64), OSDSConfig(num_iterations=5),
                            generator=torch.Generator().manual_seed(seed), disable_progbar=True) for seed in (0, 1)]
    for chain in chains:
        chain.fit()
    draws = [chain.draw(400) for chain in chains]
    report = check_draws(chains, draws, 1)
    assert report.weighted and len(report.modes) == 2 and all(m.masses and not m.lost for m in report.modes)
    ev = report.log_evidence()
    assert ev.pooled.num_draws == 800 and len(ev.chains) == 2 and len(ev.components) == 4  # 2 chains x 2 modes
    assert ev.num_lost_modes == 0 and not ev.too_many_modes


def test_draws_without_weights_have_no_evidence_and_say_why():
    chain = build_sampler(batched, torch.zeros(3, dtype=D64), OSDSConfig(mode_search_starts=0),
                          generator=torch.Generator().manual_seed(0))
    report = check_draws([chain], [chain.draw(50, log_det="none")], 1)
    assert not report.weighted and report.evidence is None and report.modes[0].lost == ()
    with pytest.raises(EvidenceError, match="carry no importance weights"):
        report.log_evidence()


def test_the_runner_checks_each_set_of_draws_once_and_reloaded_draws_when_asked(tmp_path):
    osds = make(num_iterations=5).run()
    report = osds.draw_report
    assert osds.draw_report is report and osds.log_evidence() is report.evidence  # no second computation
    osds.sample(120)
    assert osds.draw_report is not report and osds.log_evidence().num_draws == 240  # new draws, a new report
    osds.save(tmp_path / "run.pt")
    loaded = OSDS.load(tmp_path / "run.pt", potential_fn=osds.potential_fn)
    assert loaded.draw_report.evidence == osds.draw_report.evidence  # the restored draws checked on demand


def test_the_evidence_reads_the_tail_from_each_chains_diagnostic_draws_too(tmp_path):
    pyro.set_rng_seed(0)
    osds = make(num_iterations=5, diagnostic_draws=3000).run()
    pyro.set_rng_seed(0)
    plain = make(num_iterations=5, diagnostic_draws=0).run()
    for a, b in zip(osds.draws, plain.draws, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.log_weight, b.log_weight)  # a stream of their own
    ev, ev_plain = osds.log_evidence(), plain.log_evidence()
    references = [chain.diagnostic_log_weights(1, "exact") for chain in osds.samplers]
    assert all(r.shape == (3000,) for r in references)
    assert osds.samplers[0].diagnostic_log_weights(1, "exact") is references[0]  # drawn once per trained state
    for chain, d, r in zip(ev.chains, osds.draws, references, strict=True):
        assert chain.k_hat == pareto_k_hat(torch.cat([d.log_weight, r])) and chain.log_z == d.evidence().log_z
    assert ev.log_z == ev_plain.log_z and ev.se >= ev_plain.se and ev_plain.chains[0].k_hat == \
        pareto_k_hat(plain.draws[0].log_weight)
    osds.save(tmp_path / "run.pt")
    loaded = OSDS.load(tmp_path / "run.pt", potential_fn=osds.potential_fn)
    assert torch.equal(loaded.samplers[1].diagnostic_log_weights(1, "exact"), references[1])  # saved with the chain
    loaded.samplers[1]._diagnostic_cache.clear()
    assert torch.equal(loaded.samplers[1].diagnostic_log_weights(1, "exact"), references[1])  # and drawn the same again
    assert loaded.samplers[1]._num_fits == osds.samplers[1]._num_fits == 1
    osds.continue_training(8)
    assert osds.samplers[0]._num_fits == 2 and not osds.samplers[0]._diagnostic_cache  # every fit: a new state
    assert not torch.equal(osds.samplers[0].diagnostic_log_weights(1, "exact"), references[0])  # trained further
    # nearly constant weights need no diagnostic draws: none are made
    exact = make(potential_fn=lambda p: batched(p["x"]), num_iterations=3, diagnostic_draws=3000).run()
    assert exact.log_evidence().ess_per_draw >= 0.99 and all(not c._diagnostic_cache for c in exact.samplers)
