# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
import math

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.objectives import build_objective
from pyro_osds.ops.integrate import ode_step
from pyro_osds.ops.losses import distillation_step_sizes, flow_kl_loss, self_distillation_loss
from pyro_osds.ops.nets import ControlNetwork, StepConditionedControl
from pyro_osds.ops.reference import ReferenceProcess
from pyro_osds.train import Trainer, TrainingDivergedError, progress_bar_disabled

D64 = torch.float64
# the paper's objective (EM paths + self-distillation); the one-step objective is tested below
SMALL = OSDSConfig.preset("paper-cpu", grid_size=8, batch_size=16, num_iterations=6, sd_warmup=2, hidden_dim=16,
                          dtype=None)


def quadratic(x):
    return 0.5 * ((x - 1.0) ** 2).sum(-1)


def make_trainer(potential=quadratic, config=SMALL, dim=3, seed=0):
    torch.manual_seed(seed)
    net = StepConditionedControl(dim, hidden_dim=config.net.hidden_dim, dtype=D64)
    gen = torch.Generator().manual_seed(seed)
    objective = build_objective(config.objective, potential, config.process, dim,
                                flow_kl_steps=config.objective.flow_kl.steps, flow_kl_gradient="path")
    return Trainer(net, objective, config.optim, generator=gen)


def test_training_runs_records_history_and_calls_the_hook():
    calls = []
    trainer = make_trainer()
    history = trainer.train(hook_fn=lambda step, info: calls.append((step, info["loss"])))
    assert trainer.step == 6 and [c[0] for c in calls] == list(range(1, 7))
    assert all(len(v) == 6 for v in history.values())
    assert all(math.isfinite(v) for v in history["loss"])
    assert math.isnan(history["sd_loss"][0]) and math.isfinite(history["sd_loss"][-1])  # warm-up
    diffusion = SMALL.objective.diffusion
    assert diffusion.distillation_weight(1) == pytest.approx(0.125)
    assert diffusion.distillation_weight(10) == pytest.approx(0.25)


def test_ema_tracks_the_network():
    trainer = make_trainer()
    trainer.train()
    diffs = [float((p - q).detach().abs().max()) for p, q in zip(trainer.net.parameters(), trainer.ema.parameters(), strict=True)]
    assert max(diffs) > 0  # the EMA lags behind


def test_resume_from_a_state_dict_is_bit_identical():
    full = make_trainer()
    full.train(6)
    part = make_trainer()
    part.train(3)
    state = part.state_dict()
    resumed = make_trainer(seed=123)  # different initial weights and generator: all overwritten
    resumed.load_state_dict(state)
    resumed.train(3)
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert full.history["loss"] == resumed.history["loss"]


def test_partially_non_finite_potential_is_masked():
    def potential(x):
        u = quadratic(x)
        return torch.where(x[:, 0] > 1.5, torch.full_like(u, math.nan), u)

    trainer = make_trainer(potential)
    history = trainer.train()
    assert sum(history["invalid_paths"]) > 0
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


def test_persistently_non_finite_training_stops_with_a_clear_error():
    trainer = make_trainer(lambda x: quadratic(x) * math.nan, config=SMALL.replace(max_consecutive_skips=3))
    before = [p.detach().clone() for p in trainer.net.parameters()]
    with pytest.raises(TrainingDivergedError, match="3 iterations in a row"):
        trainer.train()
    for p, b in zip(trainer.net.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_keyboard_interrupt_keeps_the_last_good_state():
    def hook(step, info):
        if step == 3:
            raise KeyboardInterrupt

    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match="interrupted at iteration 3"):
        trainer.train(hook_fn=hook)
    assert trainer.interrupted and trainer.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    trainer.train(2)
    assert trainer.step == 5 and not trainer.interrupted


def test_one_step_objective_trains_the_deterministic_flow():
    config = OSDSConfig(grid_size=8, num_iterations=6, hidden_dim=16, flow_kl_batch_size=16, flow_kl_steps=(1, 2),
                        dtype=None)
    trainer = make_trainer(config=config)
    history = trainer.train()
    assert all(math.isfinite(v) for v in history["flow_kl"])
    assert "sd_loss" not in history  # no EM paths, no distillation
    assert history["loss"] == history["flow_kl"]
    assert trainer.learning_rate(0) == pytest.approx(config.optim.learning_rate)
    assert trainer.learning_rate(config.optim.num_iterations) == pytest.approx(0.1 * config.optim.learning_rate)


def test_distillation_step_sizes():
    assert distillation_step_sizes(128) == [2, 4, 8, 16, 32, 64, 128]
    assert distillation_step_sizes(12) == [2, 4]
    assert distillation_step_sizes(7) == []


def test_self_distillation_loss_is_zero_for_a_consistent_teacher():
    # with the network at its initialisation (u = g) teacher == student, but one large Euler step
    # differs from two half steps, so the state term is positive; with equal nets and a linear map
    # it still vanishes only for d -> 0. Here we check the terms are finite and the gradient flows.
    torch.manual_seed(0)
    net = StepConditionedControl(3, hidden_dim=8, dtype=D64)
    process = ReferenceProcess(grid_size=8)
    states = torch.randn(9, 5, 3, dtype=D64)
    out = self_distillation_loss(net, net, quadratic, process, states, generator=torch.Generator().manual_seed(0))
    assert out.num_invalid == 0 and out.state > 0 and math.isfinite(out.volume)
    out.loss.backward()
    assert all(p.grad is not None for p in net.state_net.parameters())


def test_progress_bar_switch(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert not progress_bar_disabled()
    assert progress_bar_disabled(True)
    monkeypatch.setenv("CI", "true")
    assert progress_bar_disabled()


class _CubicControl(ControlNetwork):
    """u = a x + b x^3: the one-step map's derivative (1 + beta/2) + (sigma/2)(a + 3 b x^2) can change sign."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, t, d, g):
        return self.a * x + self.b * x**3


def test_flow_kl_loss_replaces_folded_draws_by_the_fold_penalty():
    process = ReferenceProcess(grid_size=4)
    beta, sigma = float(process.beta(4)), float(process.sigma(4))
    c = 1.0 + 0.5 * beta
    # one step (dt = 1): F'(x) = c (x^2 - 1), folded for |x| < 1
    net = _CubicControl(-4.0 * c / sigma, 2.0 * c / (3.0 * sigma))

    def potential(x):
        return 0.5 * (x**2).sum(-1)

    x0 = torch.linspace(-2.5, 2.5, 40, dtype=torch.float64).unsqueeze(-1)
    x = x0.squeeze(-1)
    slope = c + 0.5 * sigma * (net.a + 3.0 * net.b * x**2)  # = c (x^2 - 1), with its graph to a and b
    folded = (slope < 0).detach()
    assert 0 < int(folded.sum()) < 40
    x1 = x + 0.5 * sigma * (net.a * x + net.b * x**3) + 0.5 * beta * x
    log_w = -0.5 * x1**2 - process.prior_log_prob(x0) + torch.log(slope.abs())
    kl_part = -log_w[~folded].mean()
    penalty_part = 2.0 * (-slope[folded]).sum() / 40

    out = flow_kl_loss(net, potential, process, x0, 1, fold_weight=2.0)
    assert out.num_folded == int(folded.sum()) and out.num_invalid == 0
    torch.testing.assert_close(out.loss, (kl_part + penalty_part).detach())
    torch.testing.assert_close(out.log_weights, log_w.detach())
    grads = torch.autograd.grad(out.loss, [net.a, net.b])
    expected = torch.autograd.grad(kl_part + penalty_part, [net.a, net.b], retain_graph=True)
    torch.testing.assert_close(grads, expected)
    # the penalty's own gradient unfolds: descending it raises the negative slopes
    (penalty_grad_a,) = torch.autograd.grad(penalty_part, net.a)
    assert float(penalty_grad_a) < 0
    # only folded draws: nothing left to average, the batch trains on the penalty alone
    only = flow_kl_loss(net, potential, process, x0[folded], 1, fold_weight=2.0)
    torch.testing.assert_close(only.loss, (2.0 * (-slope[folded]).sum() / int(folded.sum())).detach())
    # fold_weight=0: folded draws stay in the mean, as without the penalty
    plain = flow_kl_loss(net, potential, process, x0, 1, fold_weight=0.0)
    torch.testing.assert_close(plain.loss, -log_w.mean().detach())


def test_flow_kl_loss_counts_draws_that_fold_in_two_steps():
    # Two folding steps give a positive orientation; such draws still fold and must be penalised.
    process = ReferenceProcess(grid_size=4)
    net = _CubicControl(-20.0, 0.5)

    def potential(x):
        return 0.5 * (x**2).sum(-1)

    x0 = torch.linspace(-2.5, 2.5, 40, dtype=torch.float64).unsqueeze(-1)
    first = ode_step(net, potential, process, x0, 4, 2, log_det="exact")
    second = ode_step(net, potential, process, first.x, 2, 2, log_det="exact")
    any_fold = (first.sign < 0) | (second.sign < 0)
    both = (first.sign < 0) & (second.sign < 0)
    assert int(both.sum()) > 0  # the case the orientation alone misses
    out = flow_kl_loss(net, potential, process, x0, 2)
    assert out.num_folded == int(any_fold.sum())
    only_orientation = flow_kl_loss(net, potential, process, x0, 2, fold_weight=0.0)
    assert only_orientation.num_folded == int(((first.sign * second.sign) < 0).sum())
