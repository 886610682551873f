# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.checks: a set of draws is checked once into a DrawReport that the warnings, the evidence and
reloaded runners read."""

import pytest
import torch

from pyro_osds import OSDS, EvidenceError
from pyro_osds.checks import check_draws
from pyro_osds.config import OSDSConfig
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
