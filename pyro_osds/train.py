# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The OSDS training loop.

Each iteration (as in the OSDS code):

1. draw ``batch_size`` prior points (clipped), roll out the stochastic EM sampler on the fine grid,
   take an AdamW step on the diffusion-sampler loss, update the EMA teacher;
2. on the same (detached) paths, take a second AdamW step on the self-distillation loss weighted by
   :math:`\alpha(\text{it}) = w_{\rm sd}\min(1, \text{it}/\text{warm-up})`, update the EMA again;
3. optionally (``flow_kl_weight`` > 0, beyond the paper), a third step on the exact reverse KL of a
   few-step deterministic flow (:func:`pyro_osds.losses.flow_kl_loss`).

Gradients are clipped to a global norm. A step whose loss or gradient is not finite is skipped and
counted; after ``max_consecutive_skips`` skips in a row training stops with
:class:`TrainingDivergedError`. All randomness comes from the trainer's own ``torch.Generator``
(seeded from the global torch RNG, hence by ``pyro.set_rng_seed``), whose state is part of
:meth:`Trainer.state_dict`, so training resumes bit-identically from a state dict.
A ``KeyboardInterrupt`` stops training after restoring the parameters of the last completed
iteration; the trainer stays usable (``interrupted`` is set).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from typing import Callable

import torch

from .config import OSDSConfig
from .losses import FLOW_KL_GRADIENTS, diffusion_loss, flow_kl_loss, self_distillation_loss
from .reference import ReferenceProcess

__all__ = ["Trainer", "TrainingDivergedError", "progress_bar_disabled"]

HISTORY_KEYS = ("loss", "elbo", "sd_loss", "state_loss", "volume_loss", "jacobian_loss", "flow_kl", "grad_norm",
                "skipped", "invalid_paths", "seconds")


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


def progress_bar_disabled(disable: bool = False) -> bool:
    """Progress bars are off when asked, or when ``CI`` or ``PYTEST_XDIST_WORKER`` is set (as in Pyro)."""
    return disable or "CI" in os.environ or "PYTEST_XDIST_WORKER" in os.environ


class Trainer:
    r"""
    Trains a control network on a batched potential (module docstring).

    :param torch.nn.Module net: the student network (trained in place).
    :param callable potential_fn: batched potential ``(batch, dim) -> (batch,)``.
    :param ReferenceProcess process: reference process and prior.
    :param int dim: state dimension.
    :param OSDSConfig config: hyper-parameters.
    :param torch.Generator generator: source of all training randomness (default: a new one seeded
        from the global torch RNG).
    :param callable hook_fn: called as ``hook_fn(step, info)`` after every iteration with the
        iteration's history entry.
    :param bool disable_progbar: no tqdm bar.
    :param str desc: progress bar label.
    :param str flow_kl_gradient: the one-step objective's gradient estimator, ``"path"`` or
        ``"total"`` (:func:`~pyro_osds.losses.flow_kl_loss`); default: ``config.flow_kl_gradient``,
        whose ``"auto"`` means ``"path"`` here (:class:`~pyro_osds.sampler.FlowSampler` resolves it
        from the mode search).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        potential_fn: Callable[[torch.Tensor], torch.Tensor],
        process: ReferenceProcess,
        dim: int,
        config: OSDSConfig,
        *,
        generator: torch.Generator | None = None,
        hook_fn: Callable | None = None,
        disable_progbar: bool = False,
        desc: str = "OSDS",
        flow_kl_gradient: str | None = None,
    ):
        self.net = net
        self.potential_fn = potential_fn
        self.process = process
        self.dim = dim
        self.config = config
        self.hook_fn = hook_fn
        self.disable_progbar = disable_progbar
        self.desc = desc
        gradient = config.flow_kl_gradient if flow_kl_gradient is None else flow_kl_gradient
        self.flow_kl_gradient = "path" if gradient == "auto" else gradient
        if self.flow_kl_gradient not in FLOW_KL_GRADIENTS:
            raise ValueError(f"`flow_kl_gradient` must be one of {FLOW_KL_GRADIENTS}, got {flow_kl_gradient!r}.")
        param = next(net.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.generator = generator
        self.step = 0
        self.num_skipped = 0
        self.consecutive_skips = 0
        self.interrupted = False
        self.history: dict[str, list] = {k: [] for k in HISTORY_KEYS}

    # ------------------------------------------------------------------------------------------
    def sd_weight(self, step: int) -> float:
        r""":math:`\alpha(\text{step}) = w_{\rm sd}\min(1, \text{step}/\text{warm-up})`."""
        cfg = self.config
        if cfg.sd_weight == 0:
            return 0.0
        if cfg.sd_warmup == 0:
            return cfg.sd_weight
        return cfg.sd_weight * min(1.0, step / cfg.sd_warmup)

    def learning_rate(self, step: int) -> float:
        """Learning rate at ``step``: constant, or cosine decay from ``learning_rate`` to a tenth of it."""
        cfg = self.config
        if cfg.lr_schedule == "constant" or cfg.num_iterations == 0:
            return cfg.learning_rate
        progress = min(step / cfg.num_iterations, 1.0)
        return cfg.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))

    def _update_ema(self):
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                p_ema.lerp_(p, 1.0 - self.config.ema_decay)

    def _optimizer_step(self, loss: torch.Tensor | None, scale: float = 1.0) -> tuple[bool, float]:
        """Backward + clipped AdamW step; returns (taken, grad_norm). Skips non-finite losses/gradients."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss is None or not bool(torch.isfinite(loss)):
            return False, math.nan
        (scale * loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        if not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return False, float(grad_norm)
        self.optimizer.step()
        self._update_ema()
        return True, float(grad_norm)

    def _snapshot(self):
        return ([p.detach().clone() for p in self.net.parameters()],
                [p.detach().clone() for p in self.ema.parameters()],
                copy.deepcopy(self.optimizer.state_dict()))

    def _restore(self, snap):
        params, ema_params, opt_state = snap
        with torch.no_grad():
            for p, s in zip(self.net.parameters(), params, strict=True):
                p.copy_(s)
            for p, s in zip(self.ema.parameters(), ema_params, strict=True):
                p.copy_(s)
        self.optimizer.load_state_dict(opt_state)

    def iteration(self) -> dict:
        """One training iteration; returns its history entry."""
        cfg = self.config
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        diff, sd, skipped, grad_norm = None, None, 0, math.nan
        if cfg.diffusion_weight > 0:
            x0 = self.process.sample_prior(cfg.batch_size, self.dim, clip=True, dtype=self.dtype, device=self.device,
                                           generator=self.generator)
            diff = diffusion_loss(self.net, self.potential_fn, self.process, x0, kind=cfg.diffusion_loss,
                                  generator=self.generator)
            taken, grad_norm = self._optimizer_step(diff.loss, cfg.diffusion_weight)
            skipped += int(not taken)
            alpha = self.sd_weight(self.step)
            if alpha > 0 and bool(torch.isfinite(diff.states).all()):
                teacher = self.ema if cfg.sd_teacher == "ema" else self.net  # SCDS: the current net, no gradient
                sd = self_distillation_loss(
                    self.net, teacher, self.potential_fn, self.process, diff.states,
                    volume=cfg.train_log_det, num_probes=cfg.num_probes, volume_weight=cfg.volume_weight,
                    jacobian_weight=cfg.jacobian_weight, generator=self.generator,
                )
                sd_taken, _ = self._optimizer_step(sd.loss, alpha)
                skipped += int(not sd_taken)
        flow_kl = math.nan
        if cfg.flow_kl_weight > 0:
            steps = cfg.flow_kl_steps[self.step % len(cfg.flow_kl_steps)]
            z0 = self.process.sample_prior(cfg.flow_kl_batch_size, self.dim, dtype=self.dtype, device=self.device,
                                           generator=self.generator)
            fkl = flow_kl_loss(self.net, self.potential_fn, self.process, z0, steps, fold_weight=cfg.fold_weight,
                               gradient=self.flow_kl_gradient, path_cutoff=cfg.path_gradient_cutoff)
            fkl_taken, fkl_norm = self._optimizer_step(fkl.loss, cfg.flow_kl_weight)
            skipped += int(not fkl_taken)
            flow_kl = float(fkl.loss.detach()) if fkl.loss is not None else math.nan
            if diff is None:
                grad_norm = fkl_norm
        lw = diff.log_weights if diff is not None else fkl.log_weights
        valid_lw = lw[torch.isfinite(lw)]
        info = {
            "loss": float(diff.loss.detach()) if diff is not None and diff.loss is not None else flow_kl,
            "elbo": float(valid_lw.mean()) if valid_lw.numel() else math.nan,
            "sd_loss": float(sd.loss.detach()) if sd is not None and sd.loss is not None else math.nan,
            "state_loss": sd.state if sd is not None else math.nan,
            "volume_loss": sd.volume if sd is not None else math.nan,
            "jacobian_loss": sd.jacobian if sd is not None else math.nan,
            "flow_kl": flow_kl,
            "grad_norm": grad_norm,
            "skipped": skipped,
            "invalid_paths": diff.num_invalid if diff is not None else fkl.num_invalid,
            "seconds": time.perf_counter() - start,
        }
        return info

    def train(self, num_iterations: int | None = None) -> dict[str, list]:
        """
        Runs ``num_iterations`` iterations (default: ``config.num_iterations`` minus those already
        done) and returns the history (a dict of per-iteration lists).
        """
        cfg = self.config
        if num_iterations is None:
            num_iterations = max(cfg.num_iterations - self.step, 0)
        self.interrupted = False
        bar = None
        if not progress_bar_disabled(self.disable_progbar) and num_iterations > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_iterations, desc=self.desc, dynamic_ncols=True, leave=True)
        try:
            for _ in range(num_iterations):
                snap = self._snapshot()
                try:
                    info = self.iteration()
                except KeyboardInterrupt:
                    self._restore(snap)
                    raise
                self.step += 1
                for k in HISTORY_KEYS:
                    self.history[k].append(info[k])
                if info["skipped"]:
                    self.num_skipped += info["skipped"]
                    self.consecutive_skips += 1
                    if self.consecutive_skips >= cfg.max_consecutive_skips:
                        self._restore(snap)
                        raise TrainingDivergedError(
                            f"Training stopped at iteration {self.step}: {self.consecutive_skips} iterations in a "
                            "row had a non-finite loss or gradient (the potential overflows along the sampler's "
                            "paths, or the network diverged). Try a smaller `learning_rate`, a smaller "
                            "`prior_scale`, `precondition='gaussian'`, or check that the model's log density is "
                            "finite on its whole unconstrained space. The parameters of the last good iteration "
                            "are kept."
                        )
                else:
                    self.consecutive_skips = 0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{info['loss']:.4g}", elbo=f"{info['elbo']:.4g}", refresh=False)
                if self.hook_fn is not None:
                    self.hook_fn(self.step, info)
        except KeyboardInterrupt:
            self.interrupted = True
            warnings.warn(
                f"Training interrupted at iteration {self.step}; the sampler keeps the parameters of the last "
                "completed iteration and can be used, saved or trained further.",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            if bar is not None:
                bar.close()
        if self.num_skipped:
            warnings.warn(
                f"{self.num_skipped} optimiser step(s) were skipped because the loss or gradient was not finite.",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.history

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: network, EMA, optimiser, step, counters, history,
        generator state and the config (plain types only, loadable with ``weights_only=True``)."""
        return {
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in self.ema.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step": self.step,
            "num_skipped": self.num_skipped,
            "consecutive_skips": self.consecutive_skips,
            "history": {k: list(v) for k, v in self.history.items()},
            "generator": self.generator.get_state(),
            "config": self.config.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.num_skipped = int(state["num_skipped"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.history = {k: list(state["history"].get(k, [])) for k in HISTORY_KEYS}
        self.generator.set_state(state["generator"])

    @property
    def sampling_net(self) -> torch.nn.Module:
        """The network used for drawing: the EMA teacher if ``config.sample_with_ema``."""
        return self.ema if self.config.sample_with_ema else self.net
