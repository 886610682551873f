# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.modes: the mode-search warnings and the lost-mode check on weighted draws."""

import math

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.modes import mode_coverage, warn_about_mode_search, warn_lost_modes
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
    coverage = mode_coverage(MODES, both)
    assert [m for _, m, _ in coverage] == [0.3, 0.7]
    assert [share for _, _, share in coverage] == pytest.approx([0.25, 0.75])  # weights 1 : 3
    assert mode_coverage(MODES[:1], both) == []  # a single mode: nothing to check


def test_a_lost_mode_warns_with_its_log_z_deficit_and_the_objectives_remedy():
    torch.manual_seed(1)
    only_heavy = _draws_near(MODES[1][0])
    with pytest.warns(RuntimeWarning, match=r"Chain 0: .*low by about 0.36 nats.*paper-cpu") as record:
        assert warn_lost_modes(MODES, only_heavy, OSDSConfig().objective, "Chain 0: ") == [0]
    assert record[0].filename == __file__
    with pytest.warns(RuntimeWarning) as record:
        warn_lost_modes(MODES, only_heavy, OSDSConfig.preset("paper-cpu").objective)
    assert "paper-cpu" not in str(record[0].message)  # that objective is already in use


def test_the_mode_search_warnings():
    with pytest.warns(UserWarning, match="at least 2 separated modes.*paper-cpu"):
        warn_about_mode_search({"num_modes": 2, "modes": MODES, "light_modes": 0}, OSDSConfig().objective)
    with pytest.warns(UserWarning, match="3 further local optima"):
        warn_about_mode_search({"num_modes": 1, "light_modes": 3}, OSDSConfig().objective)
    warn_about_mode_search({"num_modes": 1, "light_modes": 0}, OSDSConfig().objective)  # nothing to say


def test_an_exhausted_search_says_so_and_gives_no_false_remedy():
    info = {"num_modes": 40, "modes": MODES * 20, "light_modes": 900, "saturated": False, "search_starts": 1024}
    with pytest.warns(UserWarning, match="kept finding new modes until its budget ran out.*independent method") as rec:
        warn_about_mode_search(info, OSDSConfig().objective)
    assert len(rec) == 1 and "paper-cpu" not in str(rec[0].message)
