# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.budget: drawing until log Z's standard error reaches a target, within a cap on the draws
and a time limit that stops training cleanly."""

import math
import time

import pytest
import torch

from pyro_osds.budget import BudgetConfig, draws_for
from pyro_osds.config import OSDSConfig
from tests.common import Z, make


def quartic_log_z() -> float:
    """The exact log Z of tests.common.quartic_potential (a product of three 1-D densities), by quadrature."""
    x = torch.linspace(-8.0, 8.0, 200_001, dtype=torch.float64)
    u = 0.5 * ((x - 1.0) / 0.7) ** 2 + 0.1 * x**4
    return 3 * float(torch.logsumexp(-u, 0) + math.log(float(x[1] - x[0])))


def test_draws_until_the_standard_error_is_reached():
    osds = make(num_iterations=10, target_se=0.004).run()
    ev = osds.log_evidence()
    assert ev.se <= 0.004 and ev.num_draws > 200 and "target SE 0.004 reached" in ev.budget
    assert "budget: target SE 0.004 reached" in str(ev)
    assert abs(ev.log_z - quartic_log_z()) <= Z * ev.se + ev.se**2  # the estimate is right to its SE
    assert all(d.x.shape[0] == ev.num_draws // 2 for d in osds.draws)  # every chain drew as many
    assert osds.to_datatree().attrs["budget"] == ev.budget


def test_a_cap_on_the_draws_stops_with_what_was_reached_and_says_so():
    osds = make(num_iterations=2)
    osds.fit()
    with pytest.warns(RuntimeWarning, match=r"target SE 1e-05 not reached: .* the `max_draws` cap"):
        osds.config = osds.config.replace(target_se=1e-5, max_draws=600)
        osds.sample()
    ev = osds.log_evidence()
    assert 600 <= ev.num_draws <= 602 and ev.se > 1e-5 and "max_draws" in ev.budget


def test_a_time_limit_stops_training_cleanly_and_training_goes_on_later():
    start = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"Training stopped when the run's time limit \(`max_time`\) ran out"):
        osds = make(num_iterations=100_000, num_chains=1, max_time=1.5).run()
    assert time.perf_counter() - start < 30
    trainer = osds.samplers[0].trainer
    assert trainer.out_of_time and 0 < trainer.step < 100_000 and not osds.interrupted
    assert math.isfinite(osds.log_evidence().log_z)  # the draws are weighted exactly all the same
    osds.config = osds.config.replace(max_time=None)
    osds.continue_training(trainer.step + 3)
    assert trainer.step == trainer.num_iterations and not trainer.out_of_time


def test_budget_settings_are_checked():
    assert draws_for(0.02, 1000, 0.01) == 4400 and draws_for(0.005, 1000, 0.01) == 1000
    assert OSDSConfig(target_se=0.01).budget == BudgetConfig(target_se=0.01)
    for bad in (dict(target_se=0.0), dict(max_draws=0), dict(max_time=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            OSDSConfig(**bad)
