# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Training objectives: the loss functions of :mod:`pyro_osds.ops.losses` and
:mod:`pyro_osds.ops.consistency` turned into :class:`~pyro_osds.train.Stage`\ s that a
:class:`~pyro_osds.train.Trainer` runs, one optimiser step per stage.

==================  ============================================================================
objective           stages (one optimiser step each, in this order)
==================  ============================================================================
one-step (default)  :func:`flow_kl_stage`: exact reverse KL of the ``K``-step deterministic flow
the paper's         :func:`diffusion_stage` (EM-path loss) then :func:`distillation_stage`
                    (self-distillation + volume consistency + Jacobian penalty on the same paths)
DIS                 :func:`diffusion_stage` alone (log-variance loss)
SCDS                the paper's stages with the current network as teacher, no volume term
CDDS                DIS, then a second training phase of :func:`consistency_stage`
==================  ============================================================================

:func:`build_objective` assembles them from an :class:`ObjectiveConfig`; ``method="osds"`` may
combine the one-step objective with the paper's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .distributed import all_gather_rows, all_reduce_sum, shard
from .ops.consistency import consistency_grid, consistency_loss
from .ops.estimators import kish_ess
from .ops.integrate import LOG_DET_METHODS
from .ops.losses import (
    DIFFUSION_LOSSES,
    FLOW_KL_GRADIENTS,
    diffusion_loss,
    distillation_step_sizes,
    flow_kl_loss,
    self_distillation_loss,
)
from .ops.reference import ReferenceProcess
from .train import Stage, Term, TrainContext
from .util import PotentialFn, check_choice, check_number, check_positive_int

__all__ = [
    "ConsistencyConfig",
    "DiffusionConfig",
    "FlowKLConfig",
    "ObjectiveConfig",
    "build_objective",
    "consistency_stage",
    "diffusion_stage",
    "distillation_stage",
    "flow_kl_stage",
    "flow_kl_train_steps",
    "multimodal_remedy",
    "plateau_stop",
    "resolve_flow_kl_gradient",
]


# ---------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class FlowKLConfig:
    r"""
    The one-step objective (flat option names in brackets).

    :param float weight: its weight (``flow_kl_weight``, 1; 0 turns it off).
    :param tuple steps: flow step counts :math:`K` trained, cycled over iterations (``flow_kl_steps``,
        ``(1,)``; :class:`~pyro_osds.OSDS` adds the step count it draws with).
    :param int batch_size: prior draws per iteration (``flow_kl_batch_size``, 256).
    :param float fold_weight: folded draws leave the reverse-KL mean and pay this times
        :func:`~pyro_osds.ops.integrate.fold_penalty` (1; 0 turns this off).
    :param str gradient: the gradient estimator (``flow_kl_gradient``): ``"path"`` (sticking the
        landing), ``"total"`` (plain reparameterisation) or ``"auto"`` (``"total"`` when the mode search
        found several modes, else ``"path"``); see :func:`~pyro_osds.ops.losses.flow_kl_loss`.
    :param path_cutoff: draws whose path direction exceeds this many batch-median norms of the target's
        score keep the total gradient (``path_gradient_cutoff``, 5; ``None``: none does).
    :param float tempering: the fraction of the iterations over which the trained target is tempered
        (``flow_kl_tempering``, 0: off): at iteration :math:`i` the flow is trained on
        :math:`\pi^{\beta} p_0^{1-\beta}` with :math:`\beta = \min(1, i / (\text{tempering} \cdot
        \text{num\_iterations}))`, from the base :math:`p_0` (which the untrained map already is) to the
        target; a flow that covers separated modes while they emerge keeps them.
    :param bool early_stop: train only as long as it pays (``early_stopping``, ``True``): no training when the
        untrained map already fits (:meth:`~pyro_osds.samplers.FlowSampler.fits_untrained`), and a stop when the
        training draws' ESS/N averages 0.99 over 100 iterations or the ELBO gains less than 0.01 nats per 100
        iterations twice in a row (:func:`plateau_stop`); ``num_iterations`` stays the maximum.
    """

    weight: float = 1.0
    steps: tuple = (1,)
    batch_size: int = 256
    fold_weight: float = 1.0
    gradient: str = "auto"
    path_cutoff: float | None = 5.0
    tempering: float = 0.0
    early_stop: bool = True

    def __post_init__(self):
        check_number("flow_kl_weight", self.weight, low=0)
        steps = self.steps
        if (not isinstance(steps, (tuple, list)) or not steps
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps)):
            raise ValueError(f"`flow_kl_steps` must be a non-empty tuple of positive step counts, got {steps!r}.")
        object.__setattr__(self, "steps", tuple(steps))
        check_positive_int("flow_kl_batch_size", self.batch_size, minimum=2)
        check_number("fold_weight", self.fold_weight, low=0)
        check_choice("flow_kl_gradient", self.gradient, ("auto",) + FLOW_KL_GRADIENTS)
        if self.path_cutoff is not None:
            check_number("path_gradient_cutoff", self.path_cutoff, low=0, low_open=True)
        check_number("flow_kl_tempering", self.tempering, low=0, high=1)
        if not isinstance(self.early_stop, bool):
            raise TypeError(f"`early_stopping` must be True or False, got {self.early_stop!r}.")


@dataclass(frozen=True)
class DiffusionConfig:
    r"""
    The paper's objective: the diffusion-sampler loss on fine-grid EM paths, then self-distillation
    (flat option names in brackets).

    :param float weight: weight of the diffusion loss (``diffusion_weight``, 0 = off; paper 1).
    :param int batch_size: EM paths per iteration (``batch_size``, 128; paper 1024).
    :param str loss: ``"kl"`` or ``"lv"`` (log-variance) (``diffusion_loss``).
    :param float sd_weight: self-distillation weight (``sd_weight``, 0.25), reached after a linear
        ``sd_warmup`` (100 iterations; paper 2500).
    :param float volume_weight: volume-consistency weight (0.25).
    :param float jacobian_weight: Jacobian-penalty weight (1e-4).
    :param str train_log_det: the volume estimator inside the distillation loss (``"hutchinson"``),
        with ``num_probes`` probes (1).
    :param str sd_teacher: ``"ema"`` (the paper's) or ``"current"`` (SCDS: the current network, no
        gradient).
    """

    weight: float = 0.0
    batch_size: int = 128
    loss: str = "kl"
    sd_weight: float = 0.25
    sd_warmup: int = 100
    volume_weight: float = 0.25
    jacobian_weight: float = 1e-4
    train_log_det: str = "hutchinson"
    num_probes: int = 1
    sd_teacher: str = "ema"

    def __post_init__(self):
        check_positive_int("batch_size", self.batch_size, minimum=2)
        check_positive_int("num_probes", self.num_probes)
        check_positive_int("sd_warmup", self.sd_warmup, minimum=0)
        for name, value in (("diffusion_weight", self.weight), ("sd_weight", self.sd_weight),
                            ("volume_weight", self.volume_weight), ("jacobian_weight", self.jacobian_weight)):
            check_number(name, value, low=0)
        check_choice("diffusion_loss", self.loss, DIFFUSION_LOSSES)
        check_choice("train_log_det", self.train_log_det, LOG_DET_METHODS)
        check_choice("sd_teacher", self.sd_teacher, ("ema", "current"))

    def distillation_weight(self, step: int) -> float:
        r""":math:`\alpha(\text{step}) = w_{\rm sd}\min(1, \text{step}/\text{warm-up})`."""
        if self.sd_weight == 0:
            return 0.0
        if self.sd_warmup == 0:
            return self.sd_weight
        return self.sd_weight * min(1.0, step / self.sd_warmup)


@dataclass(frozen=True)
class ConsistencyConfig:
    r"""
    CDDS's consistency distillation (flat option names in brackets): ``num_iterations``
    (``consistency_iterations``, 1000) on a grid of ``num_points`` codes (``consistency_points``, 18)
    with the skip parameterisation's ``sigma_data`` (``consistency_sigma_data``, 0.5); see
    :mod:`pyro_osds.ops.consistency`.
    """

    num_iterations: int = 1000
    num_points: int = 18
    sigma_data: float = 0.5

    def __post_init__(self):
        check_positive_int("consistency_iterations", self.num_iterations, minimum=0)
        check_positive_int("consistency_points", self.num_points, minimum=2)
        check_number("consistency_sigma_data", self.sigma_data, low=0, low_open=True)


@dataclass(frozen=True)
class ObjectiveConfig:
    """What a chain is trained on: the one-step objective, the paper's, and CDDS's consistency phase."""

    flow_kl: FlowKLConfig = field(default_factory=FlowKLConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)

    def __post_init__(self):
        if self.diffusion.weight == 0 and self.flow_kl.weight == 0:
            raise ValueError("Nothing to train: `diffusion_weight` and `flow_kl_weight` are both 0.")

    @property
    def trains_every_step_count(self) -> bool:
        """The paper's objective trains every step size; the one-step objective only ``flow_kl.steps``."""
        return self.diffusion.weight > 0


def flow_kl_train_steps(config: FlowKLConfig, num_steps: int | None) -> tuple[int, ...]:
    """The step counts the one-step objective trains: ``config.steps``, plus ``num_steps`` (the one a
    chain draws with) if it is missing, in sorted order then."""
    if num_steps is None or num_steps in config.steps:
        return config.steps
    return tuple(sorted({*config.steps, num_steps}))


def resolve_flow_kl_gradient(setting: str, num_modes: int) -> str:
    """The one-step objective's gradient estimator: ``setting``, where ``"auto"`` is ``"total"`` when the
    mode search found several modes (the path estimator lost modes more often on the 9-mode mixture)
    and ``"path"`` otherwise."""
    if setting != "auto":
        return setting
    return "total" if num_modes > 1 else "path"


def multimodal_remedy(objective: ObjectiveConfig) -> str | None:
    """What to try when the one-step objective drops modes (``None`` when the paper's objective is
    already in use)."""
    if objective.diffusion.weight == 0:
        return "add the paper's diffusion objective (`preset='paper-cpu', flow_kl_weight=1.0`)"
    return None


# ---------------------------------------------------------------------------------------------------
# stages


def _finite_mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def tempering_beta(tempering: float, step: int, num_iterations: int) -> float:
    r"""The inverse temperature :math:`\beta` at iteration ``step`` of a tempering over the fraction
    ``tempering`` of ``num_iterations`` (:class:`FlowKLConfig`); 1 without tempering."""
    if tempering <= 0 or num_iterations <= 0:
        return 1.0
    return min(1.0, step / (tempering * num_iterations))


def flow_kl_stage(config: FlowKLConfig, potential_fn: PotentialFn, process: ReferenceProcess, dim: int, *,
                  steps: tuple[int, ...], gradient: str) -> Stage:
    """The one-step objective (:func:`~pyro_osds.ops.losses.flow_kl_loss`) on ``config.batch_size``
    prior draws of the ``steps[i % len(steps)]``-step flow at iteration ``i``; ``gradient`` is a
    resolved estimator (``"path"`` or ``"total"``, see :func:`resolve_flow_kl_gradient`)."""
    check_choice("gradient", gradient, FLOW_KL_GRADIENTS)

    def term(context: TrainContext) -> Term:
        num_steps = steps[context.step % len(steps)]
        # the whole batch's noise on every rank (the same stream), then this rank's shard: the union over the
        # ranks is the batch one process would draw
        z0 = process.sample_prior(config.batch_size, dim, dtype=context.dtype, device=context.device,
                                  generator=context.generator)
        ctx = context.distributed
        share = 1.0
        if ctx is not None:
            rows = shard(config.batch_size, ctx)
            z0, share = z0[rows], (rows.stop - rows.start) / config.batch_size
        target = potential_fn
        beta = tempering_beta(config.tempering, context.step, context.num_iterations)
        if beta < 1:
            def target(z, beta=beta):  # pi^beta p0^(1 - beta), p0 = N(0, prior_scale^2 I)
                return beta * potential_fn(z) + (1 - beta) * 0.5 * (z**2).sum(-1) / process.prior_scale**2
        # the path estimator's cutoff from the whole batch's median score norm
        path_scale = None if ctx is None else (lambda norms: all_gather_rows(norms, ctx).median())
        out = flow_kl_loss(context.net, target, process, z0, num_steps, fold_weight=config.fold_weight,
                           gradient=gradient, path_cutoff=config.path_cutoff, path_scale=path_scale,
                           static=context.static)
        value = out.loss.detach() if out.loss is not None else math.nan
        log_weights, num_invalid = out.log_weights.detach(), out.num_invalid
        if ctx is not None:  # the whole batch's values on every rank, so that every rank stops at the same step
            total = all_reduce_sum(torch.tensor([float(value) * share, float(num_invalid)], dtype=torch.float64,
                                                  device="cpu"), ctx)
            value, num_invalid = float(total[0]), int(total[1])
            log_weights = all_gather_rows(log_weights, ctx)

        @functools.cache
        def weights_statistics():  # the ELBO and ESS/N of the training draws, computed when the trainer reads them
            finite = log_weights[torch.isfinite(log_weights)]
            ess = float(kish_ess(finite)) / log_weights.numel() if finite.numel() else math.nan
            return _finite_mean(log_weights), ess

        def elbo():
            return weights_statistics()[0]

        info = {"loss": value, "elbo": elbo, "invalid_paths": num_invalid,
                "flow_kl": value, "flow_kl_elbo": elbo, "flow_kl_ess": lambda: weights_statistics()[1]}
        return Term(out.loss, config.weight, info, share)

    stop = plateau_stop if config.early_stop and config.tempering == 0 else None
    return Stage(term, keys=("flow_kl", "flow_kl_elbo", "flow_kl_ess"), stop=stop)


def plateau_stop(history: dict, step: int, *, window: int = 100, min_gain: float = 0.01, patience: int = 2,
                 perfect_ess: float = 0.99) -> str | None:
    r"""
    The one-step objective's early stop, checked every ``window`` iterations on the training draws (fresh
    draws of the current map, with exact weights): the reason to stop, or ``None``. It stops when their Kish
    ESS/N averages ``perfect_ess`` over the last window (the map is as good as its weights can show; checked
    from the first window on), or, from ``(patience + 1) * window`` iterations on, when the mean ELBO of each of
    the last ``patience`` windows is less than ``min_gain`` nats above the window before: the ELBO gap
    :math:`\mathrm{KL}(q\|\pi)` then shrinks by less than that per window, and the ESS/N, about
    :math:`e^{-2\,\mathrm{KL}}`, by less than 2%.
    """
    if step % window or step < window:
        return None

    def window_mean(key, k):  # mean of the finite values of window k counted back from the last (k = 0)
        values = torch.tensor(history[key][len(history[key]) - (k + 1) * window:len(history[key]) - k * window],
                              dtype=torch.float64, device="cpu")
        values = values[torch.isfinite(values)]
        return float(values.mean()) if values.numel() else math.nan

    ess = window_mean("flow_kl_ess", 0)
    if ess >= perfect_ess:
        return f"the training draws' ESS/N averaged {ess:.3f} over the last {window} iterations"
    if step < (patience + 1) * window:
        return None
    means = [window_mean("flow_kl_elbo", k) for k in range(patience + 1)]
    gains = [means[k] - means[k + 1] for k in range(patience)]
    if all(math.isfinite(g) and g < min_gain for g in gains):
        return (f"the ELBO gained less than {min_gain} nats per {window} iterations over the last "
                f"{patience * window} iterations")
    return None


def diffusion_stage(config: DiffusionConfig, potential_fn: PotentialFn, process: ReferenceProcess, dim: int) -> Stage:
    """The diffusion-sampler loss (:func:`~pyro_osds.ops.losses.diffusion_loss`) on ``config.batch_size``
    fine-grid EM paths from clipped prior draws; leaves the paths in ``context.scratch["states"]`` for
    :func:`distillation_stage`."""

    def term(context: TrainContext) -> Term:
        x0 = process.sample_prior(config.batch_size, dim, clip=True, dtype=context.dtype, device=context.device,
                                  generator=context.generator)
        out = diffusion_loss(context.net, potential_fn, process, x0, kind=config.loss, generator=context.generator)
        context.scratch["states"] = out.states
        info = {"loss": float(out.loss.detach()) if out.loss is not None else math.nan,
                "elbo": _finite_mean(out.log_weights), "invalid_paths": out.num_invalid}
        return Term(out.loss, config.weight, info)

    return Stage(term)


def distillation_stage(config: DiffusionConfig, potential_fn: PotentialFn, process: ReferenceProcess) -> Stage:
    r"""Self-distillation + volume consistency + Jacobian penalty
    (:func:`~pyro_osds.ops.losses.self_distillation_loss`) on the paths of the preceding
    :func:`diffusion_stage`, weighted by :meth:`DiffusionConfig.distillation_weight`; the teacher is the
    EMA network (or the current one, ``sd_teacher="current"``). Nothing to train while the weight is
    zero or when a path is not finite."""

    def term(context: TrainContext) -> Term | None:
        alpha = config.distillation_weight(context.step)
        states = context.scratch.get("states")
        if alpha <= 0 or states is None or not bool(torch.isfinite(states).all()):
            return None
        teacher = context.ema if config.sd_teacher == "ema" else context.net
        out = self_distillation_loss(
            context.net, teacher, potential_fn, process, states, volume=config.train_log_det,
            num_probes=config.num_probes, volume_weight=config.volume_weight,
            jacobian_weight=config.jacobian_weight, generator=context.generator,
        )
        info = {"sd_loss": float(out.loss.detach()) if out.loss is not None else math.nan,
                "state_loss": out.state, "volume_loss": out.volume, "jacobian_loss": out.jacobian}
        return Term(out.loss, alpha, info)

    return Stage(term, keys=("sd_loss", "state_loss", "volume_loss", "jacobian_loss"))


def consistency_stage(config: ConsistencyConfig, teacher: torch.nn.Module, potential_fn: PotentialFn,
                      process: ReferenceProcess, dim: int, *, batch_size: int) -> Stage:
    r"""Consistency distillation (:func:`~pyro_osds.ops.consistency.consistency_loss`) of the frozen
    ``teacher``'s probability-flow ODE into the trained network, with the EMA network as the target
    :math:`\theta^-`, on ``batch_size`` clipped prior draws."""
    codes = consistency_grid(process.grid_size, config.num_points)

    def term(context: TrainContext) -> Term:
        x0 = process.sample_prior(batch_size, dim, clip=True, dtype=context.dtype, device=context.device,
                                  generator=context.generator)
        loss, num_invalid = consistency_loss(context.net, context.ema, teacher, potential_fn, process, x0, codes,
                                             sigma_data=config.sigma_data, generator=context.generator)
        info = {"loss": float(loss.detach()) if loss is not None else math.nan, "invalid_paths": num_invalid}
        return Term(loss, 1.0, info)

    return Stage(term)


def build_objective(objective: ObjectiveConfig, potential_fn: PotentialFn, process: ReferenceProcess, dim: int, *,
                    flow_kl_steps: tuple[int, ...], flow_kl_gradient: str) -> tuple[Stage, ...]:
    """The stages of ``objective`` (module docstring): the paper's stages when ``diffusion.weight > 0``
    (the distillation stage when ``sd_weight > 0``), then the one-step objective when
    ``flow_kl.weight > 0``."""
    stages = []
    if objective.diffusion.weight > 0:
        stages.append(diffusion_stage(objective.diffusion, potential_fn, process, dim))
        if objective.diffusion.sd_weight > 0:
            if not distillation_step_sizes(process.grid_size):
                raise ValueError(f"Self-distillation needs an even `grid_size`, got {process.grid_size}.")
            stages.append(distillation_stage(objective.diffusion, potential_fn, process))
    if objective.flow_kl.weight > 0:
        stages.append(flow_kl_stage(objective.flow_kl, potential_fn, process, dim, steps=flow_kl_steps,
                                    gradient=flow_kl_gradient))
    return tuple(stages)
