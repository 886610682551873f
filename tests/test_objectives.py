# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.objectives: the stages of each objective, their history, the distillation schedule and the
"auto" flow-KL gradient estimator."""

import math
import warnings

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.objectives import (
    DiffusionConfig,
    FlowKLConfig,
    ObjectiveConfig,
    build_objective,
    distillation_stage,
    flow_kl_stage,
    flow_kl_train_steps,
    multimodal_remedy,
    plateau_stop,
    resolve_flow_kl_gradient,
    tempering_beta,
)
from pyro_osds.ops.nets import StepConditionedControl
from pyro_osds.ops.reference import ReferenceProcess
from pyro_osds.samplers import FlowSampler
from pyro_osds.train import OptimConfig, Stage, Term, TrainContext, Trainer, read_statistic
from tests.common import D64, quadratic


def _two_modes(x):
    # equal-mass modes at +-3 in the first coordinate, Gaussian in the second
    a = -0.5 * ((x[..., 0] - 3.0) ** 2)
    b = -0.5 * ((x[..., 0] + 3.0) ** 2)
    return -torch.logaddexp(a, b) + 0.5 * x[..., 1] ** 2


def _gaussian(x):
    return 0.5 * (x**2).sum(-1)


@pytest.mark.parametrize(("potential", "expected"), [(_gaussian, "path"), (_two_modes, "total")])
def test_auto_estimator_follows_the_mode_search(potential, expected):
    config = OSDSConfig.preset("smoke", mode_search_starts=8)
    sampler = FlowSampler(potential, torch.zeros(2, dtype=D64), config, disable_progbar=True,
                          generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sampler.flow_kl_gradient == expected
    forced = FlowSampler(potential, torch.zeros(2, dtype=D64), config.replace(flow_kl_gradient="path"),
                         disable_progbar=True)
    assert forced.flow_kl_gradient == "path"


def _stages(config, dim=3):
    return build_objective(config.objective, quadratic, config.process, dim, flow_kl_steps=(1,),
                           flow_kl_gradient="path")


def test_each_method_builds_its_stages():
    base = OSDSConfig.preset("smoke")
    assert [s.keys for s in _stages(base)] == [("flow_kl", "flow_kl_elbo", "flow_kl_ess")]
    assert _stages(base)[0].stop is plateau_stop  # early stopping on by default
    assert _stages(base.replace(early_stopping=False))[0].stop is None
    paper = _stages(OSDSConfig.preset("paper-cpu", grid_size=8))
    assert [s.keys for s in paper] == [(), ("sd_loss", "state_loss", "volume_loss", "jacobian_loss")]
    assert len(_stages(OSDSConfig.for_method("dis", grid_size=8))) == 1
    assert len(_stages(OSDSConfig.for_method("scds", grid_size=8))) == 2
    both = OSDSConfig.preset("paper-cpu", grid_size=8, flow_kl_weight=1.0)
    assert [s.keys for s in _stages(both)][-1] == ("flow_kl", "flow_kl_elbo", "flow_kl_ess")
    assert [s.stop for s in _stages(both)][0] is None  # the paper's stages have no rule: no early stop


def test_history_follows_the_objective():
    torch.manual_seed(0)
    config = OSDSConfig.preset("paper-cpu", grid_size=8, batch_size=8, num_iterations=3, sd_warmup=2, hidden_dim=8,
                               flow_kl_weight=1.0, flow_kl_batch_size=8, dtype=None)
    net = config.net.build(3, dtype=torch.float64)
    trainer = Trainer(net, _stages(config), config.optim, generator=torch.Generator().manual_seed(0))
    history = trainer.train()
    assert list(history) == ["loss", "elbo", "grad_norm", "skipped", "invalid_paths", "seconds", "sd_loss",
                             "state_loss", "volume_loss", "jacobian_loss", "flow_kl", "flow_kl_elbo", "flow_kl_ess"]
    # the first stage (the diffusion loss) gives the loss; the one-step objective reports on its own
    assert all(math.isfinite(v) for v in history["loss"] + history["flow_kl"])
    assert history["loss"] != history["flow_kl"]
    # no distillation at iteration 0 (warm-up weight 0): its values are missing there, not zero
    assert math.isnan(history["sd_loss"][0]) and math.isfinite(history["sd_loss"][1])


def test_distillation_waits_for_its_weight():
    config = DiffusionConfig(weight=1.0, sd_weight=0.5, sd_warmup=4)
    assert [config.distillation_weight(s) for s in (0, 2, 4, 9)] == [0.0, 0.25, 0.5, 0.5]
    assert DiffusionConfig(sd_weight=0.5, sd_warmup=0).distillation_weight(0) == 0.5
    stage = distillation_stage(config, quadratic, ReferenceProcess(grid_size=4))
    net = StepConditionedControl(3, hidden_dim=4, dtype=torch.float64)
    context = TrainContext(net, net, 0, torch.Generator(), {"states": torch.zeros(5, 2, 3, dtype=torch.float64)})
    assert stage.term(context) is None  # weight 0 at step 0
    context.step = 2
    context.scratch["states"][0, 0, 0] = math.nan
    assert stage.term(context) is None  # a non-finite path: nothing to distil this iteration


def test_flow_kl_step_counts_and_gradient_resolution():
    assert flow_kl_train_steps(FlowKLConfig(steps=(4, 1)), 1) == (4, 1)  # already trained: the order is kept
    assert flow_kl_train_steps(FlowKLConfig(steps=(4, 1)), 2) == (1, 2, 4)
    assert flow_kl_train_steps(FlowKLConfig(), None) == (1,)
    assert resolve_flow_kl_gradient("auto", 1) == "path" and resolve_flow_kl_gradient("auto", 3) == "total"
    assert resolve_flow_kl_gradient("path", 3) == "path"
    with pytest.raises(ValueError, match="`gradient` must be one of"):
        flow_kl_stage(FlowKLConfig(), quadratic, ReferenceProcess(), 3, steps=(1,), gradient="auto")


def test_advice_follows_the_objective():
    assert "paper-cpu" in multimodal_remedy(ObjectiveConfig())
    assert multimodal_remedy(OSDSConfig.preset("paper-cpu").objective) is None
    with pytest.raises(ValueError, match="Nothing to train"):
        ObjectiveConfig(flow_kl=FlowKLConfig(weight=0.0))


def test_tempering_runs_from_the_base_to_the_target():
    assert [tempering_beta(0.5, s, 100) for s in (0, 25, 50, 80)] == [0.0, 0.5, 1.0, 1.0]
    assert tempering_beta(0.0, 0, 100) == 1.0
    # at beta = 0 the trained target is the base N(0, s^2 I), which the untrained one-step map already is
    config = OSDSConfig(grid_size=8, flow_kl_batch_size=32, flow_kl_tempering=0.5, prior_scale=1.3, dtype=None)
    stage = flow_kl_stage(config.objective.flow_kl, lambda z: 100.0 * (z**2).sum(-1), config.process, 2,
                          steps=(1,), gradient="total")
    net = config.net.build(2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    at_start = stage.term(TrainContext(net, net, 0, torch.Generator().manual_seed(1), num_iterations=10))
    # log w = -|z|^2 / (2 s^2) - log p0(z) = log normaliser of p0, the same for every draw (up to the tiny init)
    # the statistics are read when the trainer reads them (read_statistic: here, at once)
    assert read_statistic(at_start.info["elbo"]) == pytest.approx(math.log(2 * math.pi * 1.3**2), abs=1e-6)
    later = stage.term(TrainContext(net, net, 9, torch.Generator().manual_seed(1), num_iterations=10))
    assert read_statistic(later.info["elbo"]) < -10  # the sharp target itself
    with pytest.raises(ValueError, match="flow_kl_tempering"):
        OSDSConfig(flow_kl_tempering=1.5)


def _history(elbo_per_window, ess=0.5, window=100):
    elbo = [e for e in elbo_per_window for _ in range(window)]
    return {"flow_kl_elbo": elbo, "flow_kl_ess": [ess] * len(elbo)}


def test_plateau_stop_waits_for_two_flat_windows_or_near_constant_weights():
    rising = _history([-12.0, -11.5, -11.2, -11.0])
    assert plateau_stop(rising, 400) is None
    flat = _history([-12.0, -11.0, -10.995, -10.99])  # gains 1.0, 0.005, 0.005
    assert plateau_stop(flat, 299) is None and plateau_stop(flat, 300 + 1) is None  # checked every 100 only
    assert "less than 0.01 nats per 100 iterations" in plateau_stop(flat, 400)
    once = _history([-12.0, -11.0, -10.995, -10.9])  # the last window gained again
    assert plateau_stop(once, 400) is None
    assert plateau_stop(_history([-12.0, -11.0, -11.0]), 200) is None  # too early: three windows needed
    perfect = _history([-12.0, -11.0, -10.0], ess=0.995)
    assert "ESS/N averaged 0.995" in plateau_stop(perfect, 300)
    # near-constant weights need no plateau: checked from the first window on
    assert "ESS/N averaged 0.995" in plateau_stop(_history([-12.0], ess=0.995), 100)
    assert plateau_stop(_history([-12.0], ess=0.98), 100) is None
    broken = _history([-12.0, float("nan"), -11.0])
    assert plateau_stop(broken, 300) is None


def test_the_trainer_stops_early_only_when_running_to_its_budget():
    net = torch.nn.Linear(2, 1)

    def term(context):
        loss = (net(torch.ones(1, 2)) ** 2).sum()
        return Term(loss, 1.0, {"loss": loss.item(), "elbo": 0.0})

    def stop(history, step):
        return "converged" if step >= 7 else None

    trainer = Trainer(net, [Stage(term, (), stop)], OptimConfig(num_iterations=50))
    trainer.train()
    assert trainer.step == 7 and trainer.stop_reason == "converged"
    trainer.train()  # a stopped run stays stopped
    assert trainer.step == 7
    state = trainer.state_dict()
    trainer.train(3)  # iterations asked for are run
    assert trainer.step == 10 and trainer.stop_reason is None
    trainer.load_state_dict(state)
    assert trainer.step == 7 and trainer.stop_reason == "converged"
    # a stage without a rule keeps the whole objective running
    both = Trainer(net, [Stage(term, (), stop), Stage(term)], OptimConfig(num_iterations=12))
    both.train()
    assert both.step == 12 and both.stop_reason is None
