# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.train: the Trainer (history, hook, EMA, exact resumption, non-finite losses, interrupts)."""

import math

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.objectives import build_objective
from pyro_osds.ops.nets import StepConditionedControl
from pyro_osds.train import (
    Trainer,
    TrainingDivergedError,
    ema_step,
    progress_bar,
    progress_bar_disabled,
    stage_report,
)
from tests.common import D64, quadratic

# the paper's objective (EM paths + self-distillation); the one-step objective is tested below
SMALL = OSDSConfig.preset("paper-cpu", grid_size=8, batch_size=16, num_iterations=6, sd_warmup=2, hidden_dim=16,
                          dtype=None)


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


def _optimizer_tensors(trainer):
    state = trainer.optimizer.state_dict()["state"]
    return {(i, k): v for i, entry in state.items() for k, v in entry.items()}


@pytest.mark.parametrize("at_step", [1, 3])
def test_an_iteration_interrupted_inside_its_update_is_undone_exactly(at_step):
    """A Ctrl-C after the optimiser has moved the parameters but before the EMA followed: the network, the EMA
    network and the optimiser's state are put back exactly as they were after the last completed iteration
    (at step 1 the optimiser had no state yet, and has none after)."""
    reference = make_trainer()
    reference.train(at_step - 1)
    trainer = make_trainer()
    update_ema = trainer._update_ema

    def interrupted_update():
        if trainer.step == at_step - 1:
            raise KeyboardInterrupt
        update_ema()

    trainer._update_ema = interrupted_update
    with pytest.warns(RuntimeWarning, match=f"interrupted at iteration {at_step - 1}"):
        trainer.train()
    assert trainer.interrupted and trainer.step == at_step - 1
    for a, b in zip(reference.net.parameters(), trainer.net.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference.ema.parameters(), trainer.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    expected, restored = _optimizer_tensors(reference), _optimizer_tensors(trainer)
    assert expected.keys() == restored.keys() and (at_step > 1) == bool(expected)
    assert all(torch.equal(expected[k], restored[k]) for k in expected)
    trainer._update_ema = update_ema
    trainer.train(2)  # and it trains on
    assert trainer.step == at_step + 1


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


def test_progress_bar_switch(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert not progress_bar_disabled()
    assert progress_bar_disabled(True)
    monkeypatch.setenv("CI", "true")
    assert progress_bar_disabled()


def test_progress_into_a_file_refreshes_rarely_on_short_lines(monkeypatch):
    # pytest's captured stderr is not a terminal, as a log file or a pipe is not
    bar = progress_bar(10, "OSDS")
    try:
        assert bar.mininterval == 30.0 and bar.ncols == 100 and not bar.dynamic_ncols
    finally:
        bar.close()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    bar = progress_bar(10, "OSDS")
    try:
        assert bar.mininterval == 0.1
    finally:
        bar.close()


def test_stage_reports_say_when_a_silent_stage_starts_and_how_long_it_took(monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with stage_report("OSDS chain 0", "mode search (64 starts per round)"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "OSDS chain 0: mode search (64 starts per round) ..."
    assert err[1].startswith("OSDS chain 0: mode search (64 starts per round) done in ") and err[1].endswith(" s")
    for disabled in ({"desc": None, "what": "x"}, {"desc": "OSDS", "what": "x", "disable": True}):
        with stage_report(**disabled):
            pass
    monkeypatch.setenv("CI", "1")
    with stage_report("OSDS", "x"):
        pass
    assert capsys.readouterr().err == ""


def test_training_that_stays_below_the_untrained_maps_elbo_stops():
    # early_stopping=False: no plateau rule (the sampler sets a baseline only with early stopping; this isolates it)
    config = OSDSConfig(num_iterations=1000, batch_size=8, hidden_dim=8, early_stopping=False)
    trainer = make_trainer(config=config)
    trainer.baseline_elbo = 1e9  # out of reach: training cannot improve on it
    trainer.train()
    assert trainer.step == trainer.behind_iterations == 300
    assert "stayed below the untrained map's" in trainer.stop_reason
    reachable = make_trainer(config=config.replace(num_iterations=320))
    reachable.baseline_elbo = -1e9  # every window above it: the rule never fires
    reachable.train()
    assert reachable.step == 320 and reachable.stop_reason is None


# ------------------------------------------------------------------------------------------------
# reading the device every `sync_every` iterations (the GPU's mode, run here on the CPU)
ONE_STEP = OSDSConfig(grid_size=8, num_iterations=60, hidden_dim=16, flow_kl_batch_size=32, dtype=None)


class DeviceReads(torch.overrides.TorchFunctionMode):
    """Counts the reads of a tensor's value by the host (what waits for a GPU) made from the given files."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.tolist}

    def __init__(self, *files):
        super().__init__()
        self.files, self.count = files, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        selects = func is torch.Tensor.__getitem__ and any(  # a boolean mask: its row count is read
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (
                args[1] if isinstance(args[1], tuple) else (args[1],)))
        if func in self.READS or selects:
            import sys

            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(self.files):
                self.count += 1
        return func(*args, **(kwargs or {}))


def test_reading_every_n_iterations_trains_as_reading_every_one_does():
    every = make_trainer(config=ONE_STEP)
    batched = make_trainer(config=ONE_STEP.replace(sync_every=25))
    every.train()
    batched.train()
    assert every.sync_every == 1 and batched.sync_every == 25  # the CPU's default, and the one asked for
    assert batched.step == 60 and {len(v) for v in batched.history.values()} == {60}
    for key in ("loss", "elbo", "flow_kl_ess", "grad_norm"):  # fused AdamW's rounding, in float64
        assert batched.history[key] == pytest.approx(every.history[key], rel=1e-8, abs=1e-10), key
    assert batched.history["skipped"] == every.history["skipped"] and batched.history["invalid_paths"] == [0] * 60
    for p, q in zip(batched.ema.parameters(), every.ema.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def test_between_reads_neither_the_trainer_nor_the_objective_reads_the_device():
    trainer = make_trainer(config=ONE_STEP.replace(sync_every=25))
    trainer.train(1)  # the optimiser's state exists
    reads = DeviceReads("pyro_osds/train.py", "pyro_osds/objectives.py")
    # the loss masks rows rather than select them: one read per iteration is left, whether any draw falls back to
    # the total gradient (and a second, their sub-batch, when some do: none here); selecting rows, it made 12
    in_loss = DeviceReads("pyro_osds/ops/losses.py", "pyro_osds/ops/lowrank.py")
    with reads, in_loss:
        records = [trainer.iteration(on_device=True) for _ in range(5)]
    assert reads.count == 0 and isinstance(records[0]["loss"], torch.Tensor)
    assert in_loss.count == 5
    trainer.step += 5
    trainer._unread.extend(records)
    with reads:
        info = trainer.read_statistics()  # the statistics become numbers when read
    assert reads.count > 0 and all(isinstance(v, (int, float)) for v in info.values())
    assert len(trainer.history["loss"]) == 6


def test_skipped_steps_on_the_device_change_nothing_and_are_counted_when_read():
    def sometimes_nan(x):  # a NaN potential at every third iteration's draws
        sometimes_nan.calls += 1
        u = quadratic(x)
        return u * math.nan if sometimes_nan.calls % 3 == 0 else u

    sometimes_nan.calls = 0
    trainer = make_trainer(sometimes_nan, config=ONE_STEP.replace(sync_every=10, num_iterations=30,
                                                                  flow_kl_gradient="total"))
    with pytest.warns(RuntimeWarning, match="optimiser step"):
        trainer.train()
    assert trainer.num_skipped == sum(trainer.history["skipped"]) > 0
    assert all(torch.isfinite(p).all() for p in list(trainer.net.parameters()) + list(trainer.ema.parameters()))
    state = trainer.optimizer.state_dict()["state"][0]
    assert int(state["step"]) == 30 - trainer.num_skipped  # a skipped step leaves the step count as it was


def test_training_that_never_has_a_finite_step_stops_at_the_next_read():
    trainer = make_trainer(lambda x: quadratic(x) * math.nan, config=ONE_STEP.replace(sync_every=10,
                                                                                      max_consecutive_skips=5))
    before = [p.detach().clone() for p in trainer.net.parameters()]
    with pytest.raises(TrainingDivergedError, match="Training stopped at iteration 5: 5 iterations in a row"):
        trainer.train()
    assert trainer.step == 10  # found at the read after iteration 10
    for p, b in zip(trainer.net.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_the_ema_step_is_one_foreach_step_and_never_reads_its_weight():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    ema = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]
    for taken in (None, torch.tensor(1), torch.tensor(0)):
        fused, looped = [e.clone() for e in ema], [e.clone() for e in ema]
        ema_step(fused, params, 0.01, taken)
        for e, p in zip(looped, params, strict=True):
            e.lerp_(p, 0.01 if taken is None else 0.01 * float(taken))
        for a, b in zip(fused, looped, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a weight on the device is never read by the host (meta tensors have no values to read: a read raises)
    meta = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    ema_step(meta, [torch.empty_like(m) for m in meta], 0.01, torch.ones((), dtype=torch.int64, device="meta"))
