# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.modes: the mode-search warnings and the two lost-mode checks on weighted draws."""

import math

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.modes import ModeCheck, check_by_density, check_by_share, warn_about_mode_search, warn_lost_modes
from pyro_osds.ops.precondition import SearchReport
from pyro_osds.results import Draws
from tests.common import D64

MODES = [(torch.tensor([-3.0, 0.0], dtype=D64), 0.3), (torch.tensor([3.0, 0.0], dtype=D64), 0.7)]


def _draws_near(centre, n=200, log_weight=0.0):
    x = centre + 0.3 * torch.randn(n, 2, dtype=D64)
    lw = torch.full((n,), log_weight, dtype=D64)
    return Draws(x, -lw, torch.zeros(n, dtype=D64), lw, None, "exact")


def test_coverage_is_the_weighted_share_near_each_mode():
    torch.manual_seed(0)
    a, b = _draws_near(MODES[0][0]), _draws_near(MODES[1][0], log_weight=math.log(3.0))
    both = Draws(*(torch.cat([u, v]) for u, v in zip(a[:4], b[:4], strict=True)), None, "exact")
    check = check_by_share(MODES, both)
    assert check.masses == (0.3, 0.7) and check.lost == ()
    assert check.shares == pytest.approx((0.25, 0.75))  # weights 1 : 3
    assert check_by_share(MODES[:1], both) == ModeCheck()  # a single mode: nothing to check


def test_a_lost_mode_warns_with_its_log_z_deficit_and_the_objectives_remedy():
    torch.manual_seed(1)
    only_heavy = _draws_near(MODES[1][0])
    check = check_by_share(MODES, only_heavy)
    assert check.lost == (0,)
    with pytest.warns(RuntimeWarning, match=r"Chain 0: .*low by about 0.36 nats.*paper-cpu") as record:
        warn_lost_modes(check, OSDSConfig().objective, "Chain 0: ")
    assert record[0].filename == __file__
    with pytest.warns(RuntimeWarning) as record:
        warn_lost_modes(check, OSDSConfig.preset("paper-cpu").objective)
    assert "paper-cpu" not in str(record[0].message)  # that objective is already in use


def test_modes_whose_centres_the_sampler_under_weights_are_lost_by_density():
    # the importance weight at each found centre against Z: a centre 100x (4.6 nats) above it is under-represented,
    # and one whose inversion failed (NaN) counts as lost
    check = check_by_density(MODES + MODES[:1], torch.tensor([0.5, 5.0, math.nan], dtype=D64), 0.0)
    assert check.lost == (1, 2) and check.shares is None and check.masses == (0.3, 0.7, 0.3)
    with pytest.warns(RuntimeWarning, match="under-represent 2 of the 3 modes"):
        warn_lost_modes(check, OSDSConfig().objective)
    warn_lost_modes(check_by_density(MODES, torch.tensor([0.2, 0.3], dtype=D64), 0.0), OSDSConfig().objective)


def test_the_mode_search_warnings():
    with pytest.warns(UserWarning, match="at least 2 separated modes.*paper-cpu"):
        warn_about_mode_search(SearchReport(tuple(MODES), num_modes=2), OSDSConfig().objective)
    with pytest.warns(UserWarning, match="3 further local optima"):
        warn_about_mode_search(SearchReport(num_modes=1, num_light=3), OSDSConfig().objective)
    warn_about_mode_search(SearchReport(num_modes=1), OSDSConfig().objective)  # nothing to say


def test_an_exhausted_search_says_so_and_gives_no_false_remedy():
    report = SearchReport(tuple(MODES * 20), num_modes=40, num_light=900, saturated=False, num_starts=1024)
    assert report.too_many_modes
    with pytest.warns(UserWarning, match="kept finding new modes until its budget ran out.*independent method") as rec:
        warn_about_mode_search(report, OSDSConfig().objective)
    assert len(rec) == 1 and "paper-cpu" not in str(rec[0].message)
    spread = report._replace(marginal_mixture=True)  # a marginal mixture spreads over them
    assert not spread.too_many_modes
    with pytest.warns(UserWarning, match="marginal mixture"):
        warn_about_mode_search(spread, OSDSConfig().objective)
