# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""The cost report: potential evaluations, network passes and seconds per phase, counted independently here."""

import json

import pytest
import torch

from pyro_osds import OSDS, OSDSConfig
from pyro_osds.cost import Cost, CostMeter, PhaseCost
from pyro_osds.samplers import FlowSampler, build_sampler
from tests.common import D64, batched, make, two_mode_potential


class Counting:
    """A batched potential that counts the rows it is called on (the test's own count)."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x):
        self.rows += x.shape[0]
        return self.fn(x)


def test_a_chain_counts_every_potential_row_and_network_pass_in_its_phase():
    potential = Counting(batched)
    config = OSDSConfig(num_iterations=6, batch_size=32, early_stopping=False, mode_search_starts=4)
    sampler = build_sampler(potential, torch.zeros(3, dtype=D64), config, disable_progbar=True,
                            generator=torch.Generator().manual_seed(0))
    sampler.fit()
    fitted = sampler.cost
    assert fitted.total.potential_evaluations == potential.rows > 0
    assert fitted.search.potential_evaluations > 0 and fitted.preconditioner.potential_evaluations > 0
    assert fitted.training.network_passes > 0 and fitted.drawing == PhaseCost()
    assert fitted.search.network_passes == fitted.preconditioner.network_passes == 0

    # draws of the 2-step map: two passes and (a step from the prior end needs no score) one score and one
    # weight evaluation per draw, all in the drawing phase
    before = potential.rows
    sampler.draw(50, 2)
    drawn = sampler.cost
    assert drawn.drawing.network_passes == 100
    assert drawn.drawing.potential_evaluations == potential.rows - before == 100
    assert drawn.drawing.seconds > 0
    assert drawn._replace(drawing=PhaseCost()) == fitted  # nothing else moved


def test_a_mixture_counts_its_components_on_one_meter():
    potential = Counting(two_mode_potential)
    sampler = build_sampler(potential, torch.zeros(2, dtype=D64), OSDSConfig(num_iterations=4, batch_size=32),
                            disable_progbar=True, generator=torch.Generator().manual_seed(0))
    assert len(sampler.components) == 2 and all(c.meter is sampler.meter for c in sampler.components)
    sampler.fit()
    sampler.draw(40)
    assert sampler.cost.total.potential_evaluations == potential.rows
    assert sampler.cost.drawing.network_passes >= 40


def test_phases_nest_into_the_outer_one_and_counts_default_to_drawing():
    meter = CostMeter()
    potential = meter.counted(batched)
    potential(torch.zeros(5, 3, dtype=D64))
    with meter.phase("training"):
        potential(torch.zeros(7, 3, dtype=D64))
        with meter.phase("drawing"):  # a pilot draw during training is training
            potential(torch.zeros(2, 3, dtype=D64))
    cost = meter.cost()
    assert cost.drawing.potential_evaluations == 5 and cost.training.potential_evaluations == 9
    assert cost.drawing.seconds == 0 and cost.training.seconds > 0
    with pytest.raises(ValueError, match="Unknown phase 'warmup'"):
        with meter.phase("warmup"):
            pass
    again = CostMeter()
    again.load_state(meter.state())
    assert again.cost() == cost
    both = Cost.sum([cost, cost])
    assert both.training.potential_evaluations == 18 and both.total.potential_evaluations == 28
    flat = both.as_dict()
    assert flat["potential_evaluations"] == 28 and flat["training_potential_evaluations"] == 18


def test_the_runner_reports_the_chains_cost_in_its_evidence_and_arviz_and_keeps_it_on_save(tmp_path):
    osds = make(num_chains=2, num_iterations=5).run()
    evidence = osds.log_evidence()
    assert evidence.cost == Cost.sum(chain.cost for chain in osds.samplers)
    assert evidence.cost.training.seconds > 0 and evidence.cost.drawing.potential_evaluations >= 200
    assert "potential evaluations" in str(evidence)
    tree = osds.to_datatree()
    assert tree.attrs["potential_evaluations"] == evidence.cost.total.potential_evaluations
    assert json.loads(tree.attrs["cost"])["training_network_passes"] == evidence.cost.training.network_passes
    path = tmp_path / "osds.pt"
    osds.save(path)
    loaded = OSDS.load(path, potential_fn=osds.potential_fn)
    assert [c.cost for c in loaded.samplers] == [c.cost for c in osds.samplers]


def test_chains_trained_in_processes_bring_their_cost_back():
    osds = make(num_chains=2, num_iterations=5, chain_method="processes", disable_progbar=True).fit()
    for chain in osds.samplers:
        assert chain.cost.training.network_passes > 0 and chain.cost.preconditioner.potential_evaluations > 0


def test_a_flow_sampler_built_alone_counts_from_its_own_meter():
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), OSDSConfig(num_iterations=3, early_stopping=False),
                          disable_progbar=True)
    sampler.fit()
    assert sampler.cost.training.network_passes > 0 and sampler.cost.search == PhaseCost()
