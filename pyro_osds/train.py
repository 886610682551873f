# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The training loop, for any objective.

An *objective* (:mod:`pyro_osds.objectives`) is a sequence of :class:`Stage`\ s. Each iteration runs
them in order; a stage returns a :class:`Term` (a loss, its weight and named values for the
history) or ``None`` (nothing to train this iteration), and every term gets its own optimiser
step: backward of ``weight * loss``, gradients clipped to a global norm, an AdamW step and an update
of the EMA network :math:`\bar\theta \leftarrow \bar\theta + (1 - \gamma)(\theta - \bar\theta)`.
The paper's objective, for instance, takes one step on the diffusion loss and a second on the
self-distillation loss of the same paths.

A step whose loss or gradient is not finite is skipped and counted; after
``max_consecutive_skips`` iterations with a skip in a row, training stops with
:class:`TrainingDivergedError` and keeps the parameters of the last good iteration.

On a GPU the host must not wait for the device inside an iteration: the statistics a stage reports (tensors, or
functions of tensors) are read every ``sync_every`` iterations (:class:`OptimConfig`), and between reads the
optimiser skips a non-finite step on the device (fused AdamW with a ``found_inf`` flag, as
:class:`torch.amp.GradScaler` does). On the CPU, where reading a tensor costs nothing, they are read every
iteration. All randomness
comes from the trainer's own ``torch.Generator``, whose state is part of :meth:`Trainer.state_dict`,
so training resumes bit-identically from a state dict. A ``KeyboardInterrupt`` stops training after
restoring the parameters of the last completed iteration; the trainer stays usable (``interrupted``
is set).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .distributed import DistributedContext, all_reduce_gradients, all_reduce_sum
from .util import check_choice, check_number, check_positive_int, seeded_generator, warn

__all__ = ["OptimConfig", "Stage", "Term", "TrainContext", "Trainer", "TrainingDivergedError", "ema_step",
           "progress_bar", "progress_bar_disabled", "read_statistic", "stage_report"]

#: history entries of every objective (stages add their own named values)
COMMON_KEYS = ("loss", "elbo", "grad_norm", "skipped", "invalid_paths", "seconds")


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


def progress_bar_disabled(disable: bool = False) -> bool:
    """Progress bars are off when asked, or when ``CI`` or ``PYTEST_XDIST_WORKER`` is set (as in Pyro)."""
    return disable or "CI" in os.environ or "PYTEST_XDIST_WORKER" in os.environ


@contextlib.contextmanager
def stage_report(desc: str | None, what: str, disable: bool = False):
    """Says on stderr that the stage ``what`` of ``desc`` (a chain's progress-bar label) starts, and how long it
    took, so that the silent stages before training (the mode search, the preconditioner's fit) are visible;
    nothing when progress bars are off or ``desc`` is ``None``."""
    if desc is None or progress_bar_disabled(disable):
        yield
        return
    start = time.perf_counter()
    print(f"{desc}: {what} ...", file=sys.stderr, flush=True)
    yield
    print(f"{desc}: {what} done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str):
    """A tqdm progress bar; on a terminal it refreshes often, into a file or pipe (no terminal) every 30 s on a
    line of at most 100 characters, so that logs stay readable."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, dynamic_ncols=interactive, leave=True, ncols=None if interactive else 100,
                mininterval=0.1 if interactive else 30.0)


@dataclass(frozen=True)
class OptimConfig:
    r"""
    Optimisation settings of a :class:`Trainer`.

    :param int num_iterations: training iterations (800; the paper's 60 000).
    :param float learning_rate: AdamW learning rate (5e-3; paper 5e-4).
    :param str lr_schedule: ``"cosine"`` (decay to a tenth over ``num_iterations``) or ``"constant"``.
    :param float weight_decay: AdamW weight decay (0.01; paper 0.1).
    :param float grad_clip: global gradient-norm clip (10; paper 1).
    :param float ema_decay: decay :math:`\gamma` of the EMA network (0.995; paper 0.999), which is also
        the self-distillation teacher.
    :param bool sample_with_ema: draw with the EMA network (paper: yes).
    :param int max_consecutive_skips: stop with :class:`TrainingDivergedError` after this many
        iterations with a non-finite step in a row (50).
    :param int sync_every: iterations between the host's reads of the training statistics (``None``: every
        iteration on the CPU, where reading costs nothing, else 25; always every iteration with a ``hook_fn`` or
        across a process group). In between, non-finite steps are skipped on the device and the skipped-step
        count, the progress bar and the early stop (checked every 100 iterations) wait for the next read.
    """

    num_iterations: int = 800
    learning_rate: float = 5e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.995
    sample_with_ema: bool = False
    max_consecutive_skips: int = 50
    sync_every: int | None = None

    def __post_init__(self):
        check_positive_int("num_iterations", self.num_iterations, minimum=0)
        check_positive_int("max_consecutive_skips", self.max_consecutive_skips)
        if self.sync_every is not None:
            check_positive_int("sync_every", self.sync_every)
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("grad_clip", self.grad_clip, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("ema_decay", self.ema_decay, low=0, high=1)
        check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))


class Term(NamedTuple):
    """What a stage gives for one optimiser step: ``loss`` (``None``: nothing usable, counted as a
    skipped step), its ``weight``, named floats for the history and, in data-parallel training, ``share``:
    this rank's fraction of the batch its loss averages over (:mod:`pyro_osds.distributed`)."""

    loss: torch.Tensor | None
    weight: float
    info: dict
    share: float = 1.0


@dataclass
class TrainContext:
    """What a stage sees of the trainer in one iteration: the trained ``net``, its ``ema``, the
    iteration index ``step``, the ``generator`` of all training randomness, ``scratch``, a dict the
    stages of one iteration share (emptied every iteration), and the training's ``num_iterations``."""

    net: torch.nn.Module
    ema: torch.nn.Module
    step: int
    generator: torch.Generator
    scratch: dict = field(default_factory=dict)
    num_iterations: int = 0
    #: the process group of data-parallel training (``None``: one process); stages that support it draw the
    #: whole batch's noise and keep this rank's shard (:mod:`pyro_osds.distributed`)
    distributed: DistributedContext | None = None
    #: the iteration should not read the device (a GPU's, between the trainer's reads): stages that support it
    #: mask rows rather than select them (:func:`~pyro_osds.ops.losses.flow_kl_loss`'s ``static``)
    static: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


class Stage(NamedTuple):
    """One optimiser step of an objective: ``term(context) -> Term | None``, the history ``keys`` its
    terms report and optionally ``stop(history, step) -> reason | None``, its early-stopping rule
    (training that runs up to its budget stops early when every stage has a rule and each gives a reason)."""

    term: Callable[[TrainContext], Term | None]
    keys: tuple[str, ...] = ()
    stop: Callable[[dict, int], str | None] | None = None


def _diverged(step: int, skips: int) -> TrainingDivergedError:
    return TrainingDivergedError(
        f"Training stopped at iteration {step}: {skips} iterations in a row had a non-finite loss or gradient (the "
        "potential overflows along the sampler's paths, or the network diverged). Try a smaller `learning_rate`, a "
        "smaller `prior_scale`, `precondition='gaussian'`, or check that the model's log density is finite on its "
        "whole unconstrained space. The parameters of the last good iteration are kept.")


def read_statistic(value):
    """A history entry's value as the host reads it: a function of tensors is called, a one-element tensor becomes
    a Python number, anything else stays as it is."""
    if callable(value):
        value = value()
    return value.item() if isinstance(value, torch.Tensor) else value


def ema_step(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float, taken: torch.Tensor | None = None
             ) -> None:
    r"""The EMA parameters' step :math:`\bar\theta \leftarrow \bar\theta + w\,(\theta - \bar\theta)`, in place,
    for all parameters in one of torch's foreach kernels; ``taken`` (0 or 1, on the device) scales ``w`` without
    the host reading it (a weight per parameter: a 0-d tensor as one weight for all would be read as a number)."""
    with torch.no_grad():
        if taken is None:
            torch._foreach_lerp_(ema, params, weight)
        else:
            weights = [weight * taken.to(p.dtype) for p in params]
            torch._foreach_lerp_(ema, params, weights)


def _live_state(net, ema, optimizer) -> tuple[list[torch.Tensor], tuple, dict]:
    """The tensors a training iteration changes in place (parameters, EMA parameters, the optimiser's per-parameter
    tensors), the optimiser state's layout (``(parameter index, key)`` of those tensors) and its other entries."""
    params = list(net.parameters())
    tensors = params + list(ema.parameters())
    layout, others = [], {}
    for i, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                layout.append((i, key))
                tensors.append(value)
            else:
                others[(i, key)] = value
    return tensors, tuple(layout), others


def snapshot_training(net, ema, optimizer, previous=None) -> tuple:
    """A copy of what a training iteration changes (:func:`_live_state`), so that an interrupted one can be undone
    (:func:`restore_training`): written into the ``previous`` snapshot's buffers when the layout is unchanged (a few
    in-place copies rather than a deep copy of the optimiser's state dict)."""
    tensors, layout, others = _live_state(net, ema, optimizer)
    with torch.no_grad():
        if previous is not None and previous[1] == layout:
            buffers = previous[0]
            torch._foreach_copy_(buffers, tensors)  # a few kernels for all of them (on a GPU, launches are the cost)
        else:
            buffers = [t.detach().clone() for t in tensors]
    return buffers, layout, dict(others)


def restore_training(snapshot: tuple, net, ema, optimizer) -> None:
    """Puts back a :func:`snapshot_training`: parameters, EMA parameters and the optimiser's state as they were
    (entries the optimiser created since are dropped)."""
    buffers, layout, others = snapshot
    params = list(net.parameters())
    live = params + list(ema.parameters())
    for p in params:
        optimizer.state.pop(p, None)
    num_live = len(live)
    for (i, key), value in zip(layout, buffers[num_live:], strict=True):
        optimizer.state[params[i]][key] = value.clone()
    for (i, key), value in others.items():
        optimizer.state[params[i]][key] = value
    with torch.no_grad():
        for p, b in zip(live, buffers[:num_live], strict=True):
            p.copy_(b)


class Trainer:
    r"""
    Trains ``net`` on ``objective`` (module docstring).

    :param torch.nn.Module net: the network (trained in place).
    :param objective: a sequence of :class:`Stage` (:mod:`pyro_osds.objectives`).
    :param OptimConfig optim: optimisation settings.
    :param torch.Generator generator: source of all training randomness (default: a new one seeded
        from the global torch RNG).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        objective: Sequence[Stage],
        optim: OptimConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        distributed: DistributedContext | None = None,
    ):
        self.net = net
        self.distributed = distributed
        self.objective = tuple(objective)
        self.optim = OptimConfig() if optim is None else optim
        #: the total iterations (the learning-rate schedule's horizon); :meth:`train` runs up to it
        self.num_iterations = self.optim.num_iterations
        param = next(net.parameters())
        self.ema = copy.deepcopy(net).requires_grad_(False)
        #: iterations between the host's reads of the statistics (:class:`OptimConfig`)
        self.sync_every = self.optim.sync_every or (1 if param.device.type == "cpu" else 25)
        # reading less often than every iteration, non-finite steps are skipped on the device (fused AdamW with a
        # `found_inf` flag); else the step count stays on a GPU (`capturable`): no host read per optimiser step
        fused = self.sync_every > 1
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=self.optim.learning_rate,
                                           weight_decay=self.optim.weight_decay, fused=fused or None,
                                           capturable=not fused and param.device.type == "cuda")
        self.generator = seeded_generator(param.device) if generator is None else generator
        self.step = 0
        self.num_skipped = 0
        self.consecutive_skips = 0
        self.interrupted = False
        #: why training that ran up to its budget stopped before it (``None``: it did not)
        self.stop_reason: str | None = None
        #: whether the last :meth:`train` was stopped by its ``on_iteration`` (a time limit)
        self.out_of_time = False
        #: the untrained map's pilot ELBO (set by the sampler): training whose ELBO stays below it for
        #: :attr:`behind_iterations` iterations stops (``None``: no such rule)
        self.baseline_elbo: float | None = None
        keys = COMMON_KEYS + tuple(k for stage in self.objective for k in stage.keys if k not in COMMON_KEYS)
        self.history: dict[str, list] = {k: [] for k in dict.fromkeys(keys)}
        self._snapshot_buffers = None  # reused by every iteration's snapshot
        self._unread: list[dict] = []  # the iterations whose statistics the host has not read yet

    # ------------------------------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        """Learning rate at ``step``: constant, or cosine decay from ``learning_rate`` to a tenth of it."""
        optim = self.optim
        if optim.lr_schedule == "constant" or self.num_iterations == 0:
            return optim.learning_rate
        progress = min(step / self.num_iterations, 1.0)
        return optim.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    def _update_ema(self, taken: torch.Tensor | None = None):
        """The EMA network's step towards the network; ``taken`` (0 or 1, on the device: whether the optimiser's
        step was taken) scales it, so that a step skipped on the device leaves the EMA as it was."""
        ema_step(list(self.ema.parameters()), list(self.net.parameters()), 1.0 - self.optim.ema_decay, taken)

    def _optimizer_step(self, loss: torch.Tensor | None, scale: float = 1.0, share: float = 1.0
                        ) -> tuple[bool, float]:
        """Backward + clipped AdamW step; returns (taken, grad_norm). Skips non-finite losses/gradients. In
        data-parallel training every rank skips when any rank's loss is unusable, and the gradients are summed
        over the ranks with weights ``share`` (the ranks' fractions of the batch) before clipping, so every rank
        takes the same step."""
        self.optimizer.zero_grad(set_to_none=True)
        usable = loss is not None and bool(torch.isfinite(loss))
        if self.distributed is not None:
            unusable = all_reduce_sum(torch.tensor([0.0 if usable else 1.0], dtype=torch.float64, device="cpu"),
                                      self.distributed)
            usable = float(unusable) == 0.0
        if not usable:
            return False, math.nan
        (scale * loss).backward()
        if self.distributed is not None:
            all_reduce_gradients(self.net.parameters(), share, self.distributed)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.optim.grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return False, float(grad_norm)
        self.optimizer.step()
        self._update_ema()
        return True, float(grad_norm)

    def _device_step(self, loss: torch.Tensor | None, scale: float = 1.0) -> tuple[torch.Tensor | int, object]:
        """:meth:`_optimizer_step` without reading the device: the step is skipped on the device when the loss or
        the gradient is not finite (fused AdamW's ``found_inf``, the EMA's weight zeroed). Returns ``(skipped,
        grad_norm)`` as tensors (``(1, nan)`` without a loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss is None:
            return 1, math.nan
        (scale * loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.optim.grad_clip)
        skipped = ~(torch.isfinite(grad_norm) & torch.isfinite(loss.detach()))
        self.optimizer.found_inf = skipped.to(torch.float32)
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        self._update_ema(taken=~skipped)
        return skipped.to(torch.int64), grad_norm.detach()

    def network_state(self):
        """The network's, the EMA network's and the optimiser's state, for :meth:`load_network_state` (the
        iteration count and history stay as they are; plain types, loadable with ``weights_only=True``)."""
        return ([p.detach().clone() for p in self.net.parameters()],
                [p.detach().clone() for p in self.ema.parameters()],
                copy.deepcopy(self.optimizer.state_dict()))

    def load_network_state(self, state) -> None:
        """Puts back a :meth:`network_state`."""
        params, ema_params, opt_state = state
        with torch.no_grad():
            for p, s in zip(self.net.parameters(), params, strict=True):
                p.copy_(s)
            for p, s in zip(self.ema.parameters(), ema_params, strict=True):
                p.copy_(s)
        self.optimizer.load_state_dict(opt_state)

    def iteration(self, *, on_device: bool = False) -> dict:
        """
        One training iteration; returns its history entry. ``loss``, ``elbo``, ``invalid_paths`` and
        ``grad_norm`` are those of the first stage that trained; ``skipped`` counts skipped steps. With
        ``on_device`` the optimiser steps are device steps (:meth:`_device_step`). The entry's values may be
        tensors or functions of them, for :meth:`read_statistics`.
        """
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        context = TrainContext(self.net, self.ema, self.step, self.generator, num_iterations=self.num_iterations,
                               distributed=self.distributed, static=on_device)
        record: dict = {"skipped": 0}
        for stage in self.objective:
            term = stage.term(context)
            if term is None:
                continue
            if on_device:
                skipped, grad_norm = self._device_step(term.loss, term.weight)
            else:
                taken, grad_norm = self._optimizer_step(term.loss, term.weight, term.share)
                skipped = int(not taken)
            record["skipped"] = record["skipped"] + skipped
            record.setdefault("grad_norm", grad_norm)
            for key, value in term.info.items():
                record.setdefault(key, value)
        record["seconds"] = time.perf_counter() - start
        return {k: record.get(k, math.nan) for k in self.history}

    #: iterations (whole windows of 100) the training ELBO may stay below :attr:`baseline_elbo`
    behind_iterations = 300

    def early_stop_reason(self) -> str | None:
        """The stages' agreed reason to stop now (:class:`Stage`), or that the training draws' ELBO averaged
        below :attr:`baseline_elbo` over each of the last windows of 100 iterations after
        :attr:`behind_iterations` (training is not improving on the untrained map), or ``None``."""
        window = 100
        if (self.baseline_elbo is not None and self.step >= self.behind_iterations and self.step % window == 0):
            elbo = torch.tensor(self.history["elbo"][-self.behind_iterations:], dtype=torch.float64, device="cpu")
            means = [float(chunk[torch.isfinite(chunk)].mean()) for chunk in elbo.split(window)]
            if all(not m >= self.baseline_elbo for m in means):
                return (f"the training ELBO stayed below the untrained map's ({self.baseline_elbo:.3f}) for "
                        f"{self.behind_iterations} iterations")
        rules = [stage.stop for stage in self.objective]
        if not rules or any(rule is None for rule in rules):
            return None
        reasons = [rule(self.history, self.step) for rule in rules]
        return "; ".join(reasons) if all(reasons) else None

    def train(self, num_iterations: int | None = None, *, hook_fn: Callable | None = None,
              on_iteration: Callable | None = None, desc: str | None = None) -> dict[str, list]:
        """
        Runs ``num_iterations`` iterations, or by default up to :attr:`num_iterations` in total, stopping
        earlier when the objective's early-stopping rules agree (:attr:`stop_reason` says why; a later
        default call then trains no further), and returns the history (a dict of per-iteration lists).
        ``hook_fn(step, info)`` runs after every iteration with its statistics (so they are read every
        iteration), ``on_iteration(step)`` after every iteration without them, and may return a reason to stop
        now (e.g. a time limit: :attr:`out_of_time` is set, and the next call resumes); ``desc`` labels a
        progress bar (none when ``None``, or when ``CI`` is set).
        """
        if self.out_of_time:  # a run stopped by a time limit goes on
            self.stop_reason, self.out_of_time = None, False
        up_to_budget = num_iterations is None
        if up_to_budget:
            num_iterations = 0 if self.stop_reason else max(self.num_iterations - self.step, 0)
        else:
            self.stop_reason = None
        self.interrupted = False
        on_device = self.sync_every > 1 and hook_fn is None and self.distributed is None
        every = self.sync_every if on_device else 1
        bar = None
        if desc is not None and not progress_bar_disabled() and num_iterations > 0:
            bar = progress_bar(num_iterations, desc)
        try:
            for _ in range(num_iterations):
                snap = self._snapshot_buffers = snapshot_training(self.net, self.ema, self.optimizer,
                                                                  self._snapshot_buffers)
                try:
                    record = self.iteration(on_device=on_device)
                except KeyboardInterrupt:
                    restore_training(snap, self.net, self.ema, self.optimizer)
                    raise
                self.step += 1
                self._unread.append(record)
                if bar is not None:
                    bar.update(1)
                if self.step % every == 0 or self.step % self.check_every == 0:
                    info = self.read_statistics(bar, undo=None if on_device else snap)
                    if hook_fn is not None:
                        hook_fn(self.step, info)
                reason = None if on_iteration is None else on_iteration(self.step)
                if reason:
                    self.stop_reason, self.out_of_time = reason, True
                    break
                if up_to_budget and not self._unread:
                    self.stop_reason = self.early_stop_reason()
                    if self.stop_reason:
                        break
        except KeyboardInterrupt:
            self.interrupted = True
            warn(f"Training interrupted at iteration {self.step}; the sampler keeps the parameters of the last "
                 "completed iteration and can be used, saved or trained further.", RuntimeWarning)
        finally:
            try:
                self.read_statistics(bar)
            finally:
                if bar is not None:
                    bar.close()
        if self.num_skipped:
            warn(f"{self.num_skipped} optimiser step(s) were skipped because the loss or gradient was not finite.",
                 RuntimeWarning)
        return self.history

    #: the early-stopping rules are checked every this many iterations (their windows' length), so the statistics
    #: are read then too
    check_every = 100

    def read_statistics(self, bar=None, *, undo=None) -> dict:
        """
        Reads the statistics of the iterations not read yet (a tensor, or a function of tensors, becomes a
        number) into :attr:`history`, counts their skipped steps, and returns the last one's (``{}`` if none).
        Raises :class:`TrainingDivergedError` at the first of them that completes ``max_consecutive_skips``
        skipped iterations in a row, after putting back the snapshot ``undo`` (the last iteration's, when it is
        read as soon as it ends).
        """
        info: dict = {}
        step = self.step - len(self._unread)
        while self._unread:
            record = self._unread.pop(0)
            step += 1
            info = {k: read_statistic(v) for k, v in record.items()}
            for k, v in info.items():
                self.history[k].append(v)
            if not info["skipped"]:
                self.consecutive_skips = 0
                continue
            self.num_skipped += info["skipped"]
            self.consecutive_skips += 1
            if self.consecutive_skips >= self.optim.max_consecutive_skips:
                self._unread.clear()
                if undo is not None:
                    restore_training(undo, self.net, self.ema, self.optimizer)
                raise _diverged(step, self.consecutive_skips)
        if bar is not None and info:
            bar.set_postfix(loss=f"{info['loss']:.4g}", elbo=f"{info['elbo']:.4g}", refresh=False)
        return info

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: network, EMA, optimiser, step, counters, history and
        generator state (plain types only, loadable with ``weights_only=True``)."""
        self.read_statistics()
        return {
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in self.ema.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
            "num_skipped": self.num_skipped,
            "consecutive_skips": self.consecutive_skips,
            "history": {k: list(v) for k, v in self.history.items()},
            "generator": self.generator.get_state(),
            "stop_reason": self.stop_reason,
            "interrupted": self.interrupted,
            "out_of_time": self.out_of_time,
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.num_skipped = int(state["num_skipped"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.history = {k: list(state["history"].get(k, [])) for k in self.history}
        self.generator.set_state(state["generator"])
        self.stop_reason = state.get("stop_reason")
        self.interrupted = bool(state.get("interrupted", False))
        self.out_of_time = bool(state.get("out_of_time", False))

    @property
    def sampling_net(self) -> torch.nn.Module:
        """The network used for drawing: the EMA network if ``sample_with_ema``."""
        return self.ema if self.optim.sample_with_ema else self.net
