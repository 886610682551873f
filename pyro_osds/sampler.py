# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`FlowSampler`: one chain, i.e. one trainable sampler for a batched potential on
:math:`\mathbb R^D`, composed of an affine preconditioner (:func:`~pyro_osds.ops.precondition.choose_preconditioner`),
a control network, one :class:`~pyro_osds.train.Trainer` per training phase (the objective of
:mod:`pyro_osds.objectives`; CDDS has a second, consistency phase) and a transport to draw with
(:mod:`pyro_osds.transports`). No Pyro involved.

Draws are made in the preconditioned space :math:`z` (prior :math:`\mathcal N(0, \sigma_0^2 I)`,
flow of :math:`K` PF-ODE steps) and mapped to :math:`x = m + Lz`. Each draw carries

.. math::

    \log q(x) = \log p_0(z_0) - \sum_k \log|\det \partial F_k/\partial z_k| - \log|\det L|, \qquad
    \log w = -U(x) - \log q(x),

so :math:`\log\hat Z = \log\frac1N\sum w` and the ELBO :math:`\frac1N\sum\log w` refer to the
original potential :math:`U`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch

from .config import OSDSConfig
from .distributed import DistributedContext, all_gather_rows, broadcast_object, from_rank_zero, shard
from .modes import (
    lost_found_modes,
    mode_coverage,
    uncovered_modes,
    warn_about_mode_search,
    warn_lost_modes,
    warn_uncovered_modes,
)
from .objectives import build_objective, consistency_stage, flow_kl_train_steps, resolve_flow_kl_gradient
from .ops.estimators import Estimates, ForwardEstimates, evidence, forward_evidence
from .ops.integrate import em_log_weights
from .ops.marginal import MarginalMixtureMap
from .ops.precondition import (
    AffineMap,
    LaplacePartition,
    ModeSearch,
    choose_preconditioner,
    preconditioner_from_state,
    refine_component,
    whiten_potential,
)
from .results import Draws
from .train import COMMON_KEYS, Trainer, stage_report
from .transports import ConsistencyTransport, FlowTransport, MixtureTransport, draw
from .util import PotentialFn, check_positive_int, derive_seed, seeded_generator, warn

__all__ = ["Draws", "FlowSampler", "MixtureSampler", "build_sampler", "restore_sampler"]


class _Chain:
    """What every chain offers on top of its ``draw`` and ``log_q``: evidence estimates and mode reports."""

    #: pilot draws that decide whether an untrained map already fits (a mixture's components draw a quarter
    #: of it each to set the mixture weights)
    num_pilot = 1024

    def evidence(self, num_samples: int = 2000, num_steps: int = 1, *, log_det: str | None = None) -> Estimates:
        """Evidence estimates from fresh draws (never the training batch)."""
        self._require_density(num_steps)
        return self.draw(num_samples, num_steps, log_det=log_det).evidence()

    def draw_sharded(self, num_samples: int, num_steps: int = 1, *, log_det: str | None = None) -> Draws:
        """
        ``num_samples`` draws shared out over the process group (:mod:`pyro_osds.distributed`): each rank draws
        its share from its own stream (seeded from the chain's drawing stream and the rank) and every rank gets
        the union, in rank order, so that every estimate is computed on all the draws. One process: :meth:`draw`.
        """
        ctx = self.distributed
        if ctx is None:
            return self.draw(num_samples, num_steps, log_det=log_det)
        if num_samples < ctx.world_size:
            raise ValueError(f"`num_samples`={num_samples} is fewer than the {ctx.world_size} ranks drawing them.")
        rows = shard(num_samples, ctx)
        stream = seeded_generator(self.device, (derive_seed(self.draw_generator) + ctx.rank) % 2**63)
        mine = self.draw(rows.stop - rows.start, num_steps, log_det=log_det, generator=stream)
        gather = lambda t: None if t is None else all_gather_rows(t, ctx)  # noqa: E731
        return Draws(gather(mine.x), gather(mine.potential), gather(mine.log_q), gather(mine.log_weight),
                     gather(mine.orientation), mine.log_det, component=gather(mine.component))

    def forward_evidence(self, target_samples: torch.Tensor, num_steps: int = 1) -> ForwardEstimates:
        r"""EUBO and forward :math:`\log\hat Z` from exact target draws, via the exact inverse map."""
        x = torch.as_tensor(target_samples, dtype=self.model_dtype, device=self.device)
        log_q, ok = self.log_q(x, num_steps)
        with torch.no_grad():
            u = self.potential_fn(x)
        lw = (-u.to(torch.float64)) - log_q.to(torch.float64)
        if not bool(ok.all()):
            warn(f"The inverse map did not converge (or folded) for {int((~ok).sum())} of {ok.numel()} target "
                 "draws; they are excluded.", RuntimeWarning)
            lw = torch.where(ok, lw, torch.full_like(lw, math.nan))
        return forward_evidence(lw)

    def _require_density(self, num_steps: int) -> None:
        if self.config.method == "cdds" and num_steps != 1:
            raise ValueError(
                "CDDS draws with num_steps > 1 re-noise between steps, so they have no tractable density and "
                "no importance weights; estimate the evidence with num_steps=1 (exact one-step weights)."
            )

    def mode_coverage(self, draws: Draws) -> list[tuple[torch.Tensor, float, float]]:
        """Each found mode's centre, Laplace mass and weighted share of ``draws`` (:func:`pyro_osds.modes.mode_coverage`)."""
        return mode_coverage(self.modes, draws)

    @property
    def too_many_modes(self) -> bool:
        """Whether the mode search kept finding separated modes until its budget ran out: the flow covers
        some of them, and the evidence misses the mass of the others, which its weights cannot show."""
        return self.precondition_info.get("saturated", True) is False

    def lost_modes(self, draws: Draws, num_steps: int = 1, *, warn_label: str | None = None) -> list[int]:
        """
        The found modes ``draws`` (of the ``num_steps``-step map) have lost, as indices into :attr:`modes`,
        warning about them with ``warn_label`` (``None``: silently). With every mode found (a saturated search)
        a mode is lost when its weighted share of the draws is far below its Laplace mass
        (:func:`pyro_osds.modes.warn_lost_modes`); when the search found only a sample of the modes, when the
        sampler's density at its centre is far below the target's (:func:`pyro_osds.modes.uncovered_modes`).
        """
        if self.precondition_info.get("saturated", True) or len(self.modes) < 2 or self.too_many_modes:
            if warn_label is not None:
                return warn_lost_modes(self.modes, draws, self.config.objective, warn_label)
            return lost_found_modes(self.modes, draws)[1]
        centres = torch.stack([c for c, _ in self.modes]).to(device=self.device, dtype=self.model_dtype)
        if self.config.method == "cdds" and num_steps != 1:
            return []  # no density to check with
        log_q, ok = self.log_q(centres, num_steps)
        with torch.no_grad():
            log_w = -self.potential_fn(centres).to(torch.float64) - log_q.to(torch.float64)
        log_w = torch.where(ok, log_w, torch.full_like(log_w, math.nan))
        uncovered = uncovered_modes(log_w, draws.evidence().log_z)
        if warn_label is not None:
            warn_uncovered_modes(uncovered, len(self.modes), warn_label)
        return uncovered

    def warn_lost_modes(self, draws: Draws, label: str = "", num_steps: int = 1) -> list[int]:
        """Warns about the found modes ``draws`` have lost (:meth:`lost_modes`)."""
        return self.lost_modes(draws, num_steps, warn_label=label)


class FlowSampler(_Chain):
    r"""
    One chain: a one-step diffusion sampler for a batched potential (module docstring).

    :param callable potential_fn: ``(batch, dim) -> (batch,)`` potential :math:`U = -\log\rho`,
        differentiable by autograd (twice, for exact weights).
    :param torch.Tensor init: a point ``(dim,)`` where the potential is finite (sets dtype and
        device, and starts the preconditioner's fit).
    :param OSDSConfig config: hyper-parameters (``config.method == "cdds"`` trains a consistency
        function after its DIS teacher and draws with it).
    :param int num_steps: the flow step count this chain will be drawn with; the one-step objective
        trains it alongside ``flow_kl_steps``.
    :param AffineMap preconditioner: use this affine map instead of fitting one.
    :param ModeSearch search: the mode search's result to fit the preconditioner from (default: the
        sampler runs its own when ``config.preconditioner.mode_search_starts > 0``).
    :param torch.Generator generator: randomness for training (default: seeded from the global RNG);
        draws use a second generator seeded from it, so drawing never changes training.
    :param callable hook_fn: ``hook_fn(step, info)`` after every training iteration.
    :param bool disable_progbar: no progress bar.
    :param str desc: the progress bar's label.
    :param DistributedContext distributed: train and draw across this process group
        (:mod:`pyro_osds.distributed`; the one-step objective only).
    """

    def __init__(
        self,
        potential_fn: PotentialFn,
        init: torch.Tensor,
        config: OSDSConfig | None = None,
        *,
        num_steps: int | None = None,
        preconditioner: AffineMap | None = None,
        search: ModeSearch | None = None,
        generator: torch.Generator | None = None,
        hook_fn: Callable | None = None,
        disable_progbar: bool = False,
        desc: str = "OSDS",
        distributed: DistributedContext | None = None,
    ):
        self.config = config = OSDSConfig() if config is None else config
        #: one trainer per training phase started so far
        self.trainers: list[Trainer] = []
        self.distributed = distributed
        init = torch.as_tensor(init)
        if init.dim() != 1 or not init.is_floating_point():
            raise ValueError(f"`init` must be a 1-D floating point tensor, got shape {tuple(init.shape)} "
                             f"and dtype {init.dtype}.")
        if num_steps is not None:
            config.process.step_codes(num_steps)
        self.potential_fn = potential_fn
        self.init = init.detach().clone()
        self.dim = init.numel()
        # the network and flow run in `config.net.dtype` (default: the potential's); the potential is always
        # evaluated in its own dtype, on cast inputs, so any model works with a float32 flow
        self.model_dtype, self.device = init.dtype, init.device
        self.dtype = config.net.torch_dtype(init.dtype)
        self.process = config.process
        self.num_steps = num_steps
        #: the step counts the one-step objective trains
        self.train_steps = flow_kl_train_steps(config.objective.flow_kl, num_steps)
        self.generator = seeded_generator(self.device) if generator is None else generator
        # drawing has its own stream, so that sampling never perturbs (resumed) training
        self.draw_generator = seeded_generator(self.device, derive_seed(self.generator))
        self.preconditioner = None if preconditioner is None else preconditioner.to(dtype=self.dtype)
        self.search = search
        self.precondition_info: dict = {}
        #: the untrained map's pilot (stream seed, ELBO) and network state, kept from the start of a training
        #: until it ends (and in checkpoints), to give the network back if training lowered the pilot ELBO
        self.untrained: tuple[int, float, tuple] | None = None
        self.net = config.net.build(self.dim, dtype=self.dtype, device=self.device, generator=self.generator)
        self.hook_fn, self.disable_progbar, self.desc = hook_fn, disable_progbar, desc

    # ------------------------------------------------------------------------------------------
    # preconditioning
    def fit_preconditioner(self) -> AffineMap:
        """Fits the affine preconditioner chosen by ``config.precondition`` (once)."""
        if self.preconditioner is None:
            with stage_report(self.desc, f"fitting the {self.config.preconditioner.kind!r} preconditioner",
                              self.disable_progbar):
                affine, info = choose_preconditioner(self.potential_fn, self.init, self.config.preconditioner,
                                                     search=self.search, generator=self.generator)
            if self.distributed is not None:  # every rank takes rank 0's fit and random stream
                affine, info = self._take_from_rank_zero(affine, info)
            self.precondition_info.update(info)
            warn_about_mode_search(info, self.config.objective)
            self.preconditioner = affine.to(dtype=self.dtype)
        return self.preconditioner

    @property
    def too_many_modes(self) -> bool:
        """Whether the mode search kept finding separated modes until its budget ran out and the preconditioner
        does not spread over them (a marginal mixture, :mod:`pyro_osds.ops.marginal`, does, and :meth:`lost_modes`
        then checks its coverage at each found mode): the flow covers some of them, and the evidence misses the
        mass of the others, which its weights cannot show."""
        return super().too_many_modes and not isinstance(self.preconditioner, MarginalMixtureMap)

    def _take_from_rank_zero(self, affine: AffineMap, info: dict) -> tuple[AffineMap, dict]:
        """Rank 0's preconditioner, its fit's report and its training stream's state, on every rank."""
        affine, info = from_rank_zero((affine, info), self.generator, self.distributed)
        return affine.to(device=self.device), info

    @property
    def distributed(self) -> DistributedContext | None:
        """The process group this chain trains and draws across (:mod:`pyro_osds.distributed`; ``None``: one
        process); setting it also sets its trainers'."""
        return self._distributed

    @distributed.setter
    def distributed(self, ctx: DistributedContext | None) -> None:
        self._distributed = ctx
        for trainer in self.trainers:
            trainer.distributed = ctx

    def flow_potential(self, z: torch.Tensor) -> torch.Tensor:
        """The potential on inputs of the flow's dtype, or any other, returned in it (evaluated in the model's
        dtype)."""
        if z.dtype == self.model_dtype:
            return self.potential_fn(z)
        return self.potential_fn(z.to(self.model_dtype)).to(z.dtype)

    @property
    def whitened_potential(self) -> PotentialFn:
        """The potential of the preconditioned space (fits the preconditioner if needed)."""
        return whiten_potential(self.flow_potential, self.fit_preconditioner())

    @property
    def flow_kl_gradient(self) -> str:
        """The one-step objective's gradient estimator, ``"auto"`` resolved by the mode search
        (:func:`~pyro_osds.objectives.resolve_flow_kl_gradient`; fits the preconditioner if needed)."""
        setting = self.config.objective.flow_kl.gradient
        if setting == "auto":
            self.fit_preconditioner()
        return resolve_flow_kl_gradient(setting, len(self.precondition_info.get("modes", ())))

    # ------------------------------------------------------------------------------------------
    # training
    @property
    def num_phases(self) -> int:
        """Training phases: 2 for CDDS (the DIS teacher, then the consistency function), else 1."""
        return 2 if self.config.method == "cdds" else 1

    def _make_trainer(self, phase: int) -> Trainer:
        config, potential_z = self.config, self.whitened_potential
        if phase == 0:
            stages = build_objective(config.objective, potential_z, self.process, self.dim,
                                     flow_kl_steps=self.train_steps, flow_kl_gradient=self.flow_kl_gradient)
            return Trainer(self.net, stages, config.optim, generator=self.generator, distributed=self.distributed)
        # CDDS: a student initialised from the trained teacher, distilled from its probability-flow ODE
        teacher = self.trainers[0].sampling_net.requires_grad_(False)
        student = copy.deepcopy(teacher).requires_grad_(True)
        consistency = config.objective.consistency
        stage = consistency_stage(consistency, teacher, potential_z, self.process, self.dim,
                                  batch_size=config.objective.diffusion.batch_size)
        optim = dataclasses.replace(config.optim, num_iterations=consistency.num_iterations)
        return Trainer(student, [stage], optim, generator=self.generator)

    def trainer_for(self, phase: int) -> Trainer:
        """The trainer of ``phase`` (built when first needed, after the phases before it)."""
        while len(self.trainers) <= phase:
            self.trainers.append(self._make_trainer(len(self.trainers)))
        return self.trainers[phase]

    @property
    def trainer(self) -> Trainer | None:
        """The first phase's trainer (``None`` before training)."""
        return self.trainers[0] if self.trainers else None

    def _pilot_applies(self) -> bool:
        """Whether the untrained map is the one-step map training starts from (the one-step objective of one
        step count), so that pilot draws of it mean something."""
        return (self.config.method == "osds" and self.train_steps == (1,)
                and not self.config.objective.trains_every_step_count)

    def _pilot_seed(self) -> int:
        return (self.draw_generator.initial_seed() + 1) % 2**63

    def _pilot_estimate(self, seed: int | None = None) -> Estimates:
        """Estimates from :attr:`num_pilot` draws of the current one-step map, always the same base draws (their
        own stream, seeded by ``seed``, default :meth:`_pilot_seed`: the chain's draws are left alone, and two
        maps are compared on the same noise)."""
        pilot = seeded_generator(self.device, self._pilot_seed() if seed is None else seed)
        return self.draw(self.num_pilot, 1, generator=pilot).evidence()

    def fits_untrained(self, pilot: Estimates | None = None) -> bool:
        """
        Whether the untrained one-step map (the preconditioner, with the network's Langevin-like
        initial drift) already fits the target: :attr:`num_pilot` fresh draws with ESS/N >= 0.95 whose
        estimate is :attr:`~pyro_osds.ops.estimators.Estimates.reliable` (k-hat <= 0.5, or weights so near
        constant that k-hat is noise: a conjugate model's exact Gaussian preconditioner, a mixture component
        whose piece is Gaussian). Only for the one-step objective of one step count, whose untrained map this
        is; the pilot draws come from their own stream and leave the chain's draws alone (``pilot``: their
        estimates, if already made).
        """
        if not self._pilot_applies():
            return False
        est = self._pilot_estimate() if pilot is None else pilot
        fits = est.ess_per_draw >= 0.95 and est.reliable
        return fits if self.distributed is None else broadcast_object(fits, self.distributed)

    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """
        Fits the preconditioner (once) and trains every unfinished phase; returns the history of the
        last phase trained. ``num_iterations`` iterations of the first phase are run (default: up to its
        total, or less when early stopping is on: none when :meth:`fits_untrained`, and stopping on a
        plateau, :func:`~pyro_osds.objectives.plateau_stop`), and ``until`` first sets that total (the
        learning-rate schedule's horizon). With early stopping, a training from scratch that ends with a
        lower pilot ELBO than the untrained map's (the same base draws) gives the untrained network back:
        training never leaves the sampler worse than its preconditioner (measured on many-well 32-D, whose
        marginal-mixture preconditioner reverse-KL training of the flow degrades).
        """
        history: dict[str, list] = {}
        for phase in range(self.num_phases):
            trainer = self.trainer_for(phase)
            if phase == 0 and until is not None:
                check_positive_int("num_iterations", until, minimum=0)
                trainer.num_iterations = until
            if (phase == 0 and num_iterations is None and trainer.step == 0 and trainer.stop_reason is None
                    and self.config.objective.flow_kl.early_stop and self._pilot_applies()):
                seed = self._pilot_seed()
                pilot = self._pilot_estimate(seed)
                if self.fits_untrained(pilot):
                    trainer.stop_reason = "the untrained map already fits (pilot ESS/N >= 0.95, reliable weights)"
                else:
                    self.untrained = (seed, pilot.elbo, trainer.network_state())
            if phase == 0 and self.untrained is not None:
                trainer.baseline_elbo = self.untrained[1]
            desc = None if self.disable_progbar else (self.desc if phase == 0 else f"{self.desc} (consistency)")
            history = trainer.train(num_iterations if phase == 0 else None, hook_fn=self.hook_fn, desc=desc)
            if trainer.interrupted:
                break
            finished = trainer.stop_reason is not None or trainer.step >= trainer.num_iterations
            if phase == 0 and finished and self.untrained is not None:
                self._keep_better_than_untrained(trainer, *self.untrained)
                self.untrained = None
        return history

    def _keep_better_than_untrained(self, trainer: Trainer, seed: int, pilot_elbo: float, untrained: tuple) -> None:
        """Gives the untrained network back if the trained map's pilot ELBO (the same base draws) is below the
        untrained map's."""
        trained = self._pilot_estimate(seed)
        worse = not trained.elbo >= pilot_elbo
        if self.distributed is not None:
            worse = broadcast_object(worse, self.distributed)
        if worse:
            trainer.load_network_state(untrained)
            trainer.stop_reason = (f"{trainer.stop_reason or 'done'}; training lowered the pilot ELBO "
                                   f"({pilot_elbo:.3f} -> {trained.elbo:.3f}), so the untrained network is kept")

    @property
    def interrupted(self) -> bool:
        """Whether the last :meth:`fit` was stopped by ``KeyboardInterrupt``."""
        return any(t.interrupted for t in self.trainers)

    @property
    def iteration(self) -> int:
        """Completed iterations of the latest phase started."""
        return self.trainers[-1].step if self.trainers else 0

    @property
    def num_skipped(self) -> int:
        """Optimiser steps skipped as non-finite, over all phases."""
        return sum(t.num_skipped for t in self.trainers)

    @property
    def sampling_net(self) -> torch.nn.Module:
        """The network draws are made with: the last phase's (the untrained network before training)."""
        if len(self.trainers) == self.num_phases:
            return self.trainers[-1].sampling_net
        if self.num_phases == 1:
            return self.net
        raise RuntimeError("The consistency function is not trained yet; call `fit()`.")

    @property
    def trained_step_counts(self) -> tuple[int, ...] | None:
        """The flow step counts training optimises (``None``: every one, the paper's objective does)."""
        return None if self.config.objective.trains_every_step_count else self.train_steps

    # ------------------------------------------------------------------------------------------
    # drawing and weighting
    def transport(self, num_steps: int = 1, *, num_probes: int | None = None):
        """The chain's map from base draws to the potential's space with ``num_steps`` steps
        (:mod:`pyro_osds.transports`)."""
        affine, net = self.fit_preconditioner(), self.sampling_net
        dtype = self.config.evaluation.torch_dtype(self.dtype)
        if dtype != self.dtype:  # the trained parameters, exactly, in the drawing arithmetic
            affine, net = affine.to(dtype=dtype), copy.deepcopy(net).to(dtype)
        potential_z = whiten_potential(self.flow_potential, affine)
        kwargs = dict(dtype=dtype, model_dtype=self.model_dtype, base_dtype=self.dtype)
        if self.config.method == "cdds":
            return ConsistencyTransport(net, potential_z, self.process, affine, num_steps,
                                        sigma_data=self.config.objective.consistency.sigma_data, **kwargs)
        return FlowTransport(net, potential_z, self.process, affine, num_steps,
                             num_probes=num_probes or self.config.evaluation.num_probes, **kwargs)

    def draw(
        self,
        num_samples: int,
        num_steps: int = 1,
        *,
        log_det: str | None = None,
        chunk_size: int | None = None,
        num_probes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Draws:
        """
        ``num_samples`` fresh weighted draws from the ``num_steps``-step map (:func:`~pyro_osds.transports.draw`).
        ``log_det="none"`` draws without weights (the potential is not evaluated; ``potential``,
        ``log_q`` and ``log_weight`` are NaN); ``num_probes`` sets the probes of the
        ``"hutchinson"`` volume (default ``config.evaluation.num_probes``).
        """
        check_positive_int("num_samples", num_samples)
        self.process.step_codes(num_steps)
        evaluation = self.config.evaluation
        log_det = evaluation.default_log_det(self.dim) if log_det is None else log_det
        transport = self.transport(num_steps, num_probes=num_probes)
        return draw(transport, self.potential_fn, num_samples, log_det=log_det,
                    chunk_size=chunk_size or evaluation.chunk_size,
                    generator=self.draw_generator if generator is None else generator)

    def log_q(self, x: torch.Tensor, num_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Sampler log density at given points ``x`` (exact inverse of the map); returns ``(log_q, ok)``
        where ``ok`` marks points whose inversion converged with the majority orientation.
        """
        self._require_density(num_steps)
        return self.transport(num_steps).log_prob(x)

    def em_log_weights(self, num_samples: int, num_steps: int = 1, *, chunk_size: int | None = None) -> torch.Tensor:
        r"""Log-weights of stochastic EM paths with ``num_steps`` steps
        (:func:`~pyro_osds.ops.integrate.em_log_weights`; what breaks at few steps)."""
        if self.config.method == "cdds":
            raise ValueError("CDDS has no EM paths: its one-step map is deterministic (use `evidence`), and the "
                             "DIS teacher's paths describe the teacher, not the consistency function.")
        self.process.step_codes(num_steps)
        chunk = chunk_size or self.config.evaluation.chunk_size
        potential_z = self.whitened_potential
        out = []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            z0 = self.process.sample_prior(n, self.dim, dtype=self.dtype, device=self.device,
                                           generator=self.draw_generator)
            out.append(em_log_weights(self.sampling_net, potential_z, self.process, z0, num_steps,
                                      generator=self.draw_generator))
        return torch.cat(out)

    def em_evidence(self, num_samples: int = 2000, num_steps: int = 1) -> Estimates:
        """Evidence estimates from EM-path weights (for comparison with the deterministic flow)."""
        return evidence(self.em_log_weights(num_samples, num_steps), log_det="em_path", what="EM-path log-weights")

    # ------------------------------------------------------------------------------------------
    # modes
    @property
    def modes(self) -> list:
        """The separated modes the mode search found, ``[(centre, Laplace mass), ...]`` (empty for one)."""
        return list(self.precondition_info.get("modes") or [])

    # ------------------------------------------------------------------------------------------
    # persistence
    def state_dict(self) -> dict:
        """Everything needed to resume exactly or to draw again: the preconditioner, every phase's
        trainer, both generators and the modes the mode search found."""
        affine = self.fit_preconditioner()
        self.trainer_for(0)
        return {
            "kind": "flow",
            "preconditioner": affine.state(),
            "trainers": [t.state_dict() for t in self.trainers],
            "generator": self.generator.get_state(),
            "draw_generator": self.draw_generator.get_state(),
            "dim": self.dim,
            # the separated modes the mode search found (for the lost-mode check after loading)
            "modes": [(c.detach().clone(), float(m)) for c, m in self.precondition_info.get("modes", [])],
            "saturated": bool(self.precondition_info.get("saturated", True)),
            "untrained": self.untrained,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"State is for dimension {state['dim']}, this sampler has dimension {self.dim}.")
        pre = state["preconditioner"]
        self.preconditioner = preconditioner_from_state(pre, dtype=self.dtype)
        if state.get("modes"):
            self.precondition_info["modes"] = [(c, float(m)) for c, m in state["modes"]]
        self.precondition_info["saturated"] = bool(state.get("saturated", True))
        self.untrained = state.get("untrained")
        self.trainers = []
        for phase, trainer_state in enumerate(state["trainers"]):
            self.trainer_for(phase).load_state_dict(trainer_state)
        self.generator.set_state(state["generator"])
        self.draw_generator.set_state(state["draw_generator"])


class MixtureSampler(_Chain):
    r"""
    One chain as a mixture :math:`q = \sum_k \alpha_k q_k` with one component per separated mode a mode
    search found (:func:`~pyro_osds.ops.precondition.search_modes`). The modes' Laplace fits define a
    partition of unity :math:`s_k` (:class:`~pyro_osds.ops.precondition.LaplacePartition`), so that
    :math:`Z = \sum_k Z_k` with :math:`Z_k = \int \pi s_k`; component :math:`k` is a :class:`FlowSampler`
    preconditioned at mode :math:`k` (its Laplace fit, refined as ``config.preconditioner.kind`` asks) and
    trained on the piece :math:`\pi s_k`, which keeps it at that mode. A component whose untrained one-step
    map already fits its piece (:meth:`FlowSampler.fits_untrained`, with early stopping on) is not trained. Draws
    come from the :class:`~pyro_osds.transports.MixtureTransport`, each weighted by :math:`\pi s_k / q_k`
    (multiple importance sampling with the partition as weighting functions), so the weights are exact and
    :math:`\hat Z` unbiased whatever :math:`\alpha` is, and no component's density is needed at another's
    draws; after training, :math:`\alpha_k` is set from the pilot estimates :math:`\hat Z_k` (with a tenth
    spread evenly), so that draws go where the mass is.

    The constructor's arguments are :class:`FlowSampler`'s, with the ``search`` that found the modes.
    """

    def __init__(self, potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig, search: ModeSearch, *,
                 num_steps: int | None = None, generator: torch.Generator | None = None,
                 hook_fn: Callable | None = None, disable_progbar: bool = False, desc: str = "OSDS",
                 distributed: DistributedContext | None = None):
        self.config, self.potential_fn, self.search = config, potential_fn, search
        self._distributed = distributed
        init = torch.as_tensor(init)
        self.init, self.dim = init.detach().clone(), init.numel()
        self.model_dtype, self.device = init.dtype, init.device
        self.num_steps = num_steps
        self.generator = seeded_generator(self.device) if generator is None else generator
        self.draw_generator = seeded_generator(self.device, derive_seed(self.generator))
        self.partition = LaplacePartition(search.modes)
        self.components = [
            FlowSampler(self.partition.restricted(potential_fn, k), affine.shift, config, num_steps=num_steps,
                        generator=seeded_generator(self.device, derive_seed(self.generator)), hook_fn=hook_fn,
                        disable_progbar=disable_progbar, desc=f"{desc} component {k}", distributed=distributed)
            for k, (affine, _) in enumerate(search.modes)
        ]
        #: the mixture weights :math:`\alpha` (the Laplace masses until :meth:`fit` estimates them)
        self.weights = torch.tensor([w for _, w in search.modes], dtype=torch.float64)
        #: per component: trained (True), fits without training (False), not decided yet (None)
        self.trained: list[bool | None] = [None] * len(self.components)
        self.precondition_info = {"num_modes": len(search.modes), "light_modes": search.num_light,
                                  "modes": self.modes, "components": len(self.components)}

    @property
    def modes(self) -> list:
        """The modes the components sit at, ``[(centre, Laplace mass), ...]``."""
        return [(a.shift, w) for a, w in self.search.modes]

    @property
    def distributed(self) -> DistributedContext | None:
        """The process group the components train and draw across; setting it sets theirs."""
        return self._distributed

    @distributed.setter
    def distributed(self, ctx: DistributedContext | None) -> None:
        self._distributed = ctx
        for component in self.components:
            component.distributed = ctx

    @property
    def train_steps(self) -> tuple[int, ...]:
        return self.components[0].train_steps

    @property
    def trained_step_counts(self) -> tuple[int, ...] | None:
        return self.components[0].trained_step_counts

    def fit_preconditioner(self) -> None:
        """Refines each component's preconditioner from its mode's Laplace fit (once)."""
        for component, (laplace, _) in zip(self.components, self.search.modes, strict=True):
            if component.preconditioner is None:
                affine, info = refine_component(component.potential_fn, laplace, self.config.preconditioner,
                                                generator=component.generator)
                if self.distributed is not None:
                    affine, info = component._take_from_rank_zero(affine, info)
                component.preconditioner = affine.to(dtype=component.dtype)
                component.precondition_info.update(info)

    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """Fits the components' preconditioners, trains the components that need it (module docstring)
        and sets the mixture weights; returns the training history, concatenated over components."""
        self.fit_preconditioner()
        history: dict[str, list] = {key: [] for key in COMMON_KEYS}
        for k, component in enumerate(self.components):
            if self.trained[k] is not False:
                for key, values in component.fit(num_iterations, until=until).items():
                    history.setdefault(key, []).extend(values)
                self.trained[k] = component.iteration > 0
                if component.interrupted:
                    return history
        self._set_weights()
        self.precondition_info["trained_components"] = sum(bool(t) for t in self.trained)
        return history

    def _set_weights(self) -> None:
        log_z = torch.tensor([c.draw(self.num_pilot // 4, 1, generator=self.draw_generator).evidence().log_z
                              for c in self.components], dtype=torch.float64)
        laplace = torch.tensor([w for _, w in self.search.modes], dtype=torch.float64)
        share = torch.softmax(log_z, 0) if bool(torch.isfinite(log_z).all()) else laplace
        weights = 0.9 * share + 0.1 / len(self.components)
        self.weights = weights if self.distributed is None else broadcast_object(weights, self.distributed)

    @property
    def interrupted(self) -> bool:
        return any(c.interrupted for c in self.components)

    @property
    def iteration(self) -> int:
        return max(c.iteration for c in self.components)

    @property
    def num_skipped(self) -> int:
        return sum(c.num_skipped for c in self.components)

    def transport(self, num_steps: int = 1, *, num_probes: int | None = None) -> MixtureTransport:
        """The mixture of the components' transports with ``num_steps`` steps."""
        self.fit_preconditioner()
        return MixtureTransport([c.transport(num_steps, num_probes=num_probes) for c in self.components],
                                self.weights, partition=self.partition)

    def draw(self, num_samples: int, num_steps: int = 1, *, log_det: str | None = None,
             chunk_size: int | None = None, num_probes: int | None = None,
             generator: torch.Generator | None = None) -> Draws:
        """``num_samples`` fresh draws of the mixture, each weighted against the whole mixture."""
        check_positive_int("num_samples", num_samples)
        self.config.process.step_codes(num_steps)
        evaluation = self.config.evaluation
        log_det = evaluation.default_log_det(self.dim) if log_det is None else log_det
        return draw(self.transport(num_steps, num_probes=num_probes), self.potential_fn, num_samples,
                    log_det=log_det, chunk_size=chunk_size or evaluation.chunk_size,
                    generator=self.draw_generator if generator is None else generator)

    def log_q(self, x: torch.Tensor, num_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's own log density :math:`\\log\\sum_k \\alpha_k q_k(x)` at ``x`` (every component's
        exact inverse; not the partition's effective density of its draws)."""
        self._require_density(num_steps)
        return self.transport(num_steps).log_prob(x)

    def em_log_weights(self, num_samples: int, num_steps: int = 1, **kwargs) -> torch.Tensor:
        raise ValueError("EM path weights belong to a single flow; a mixture's draws are weighted by its exact "
                         "density (`draw`, `evidence`).")

    def state_dict(self) -> dict:
        """The modes (their Laplace fits and masses), the components, the mixture weights and generators."""
        self.fit_preconditioner()
        return {
            "kind": "mixture",
            "modes": [(a.shift.detach().clone(), a.scale_tril.detach().clone(), float(w)) for a, w in self.search.modes],
            "num_light": self.search.num_light,
            "components": [c.state_dict() for c in self.components],
            "weights": self.weights.clone(),
            "trained": [-1 if t is None else int(t) for t in self.trained],
            "generator": self.generator.get_state(),
            "draw_generator": self.draw_generator.get_state(),
            "dim": self.dim,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["components"]) != len(self.components):
            raise ValueError(f"State has {len(state['components'])} components, this sampler {len(self.components)}.")
        for component, component_state in zip(self.components, state["components"], strict=True):
            component.load_state_dict(component_state)
        self.weights = state["weights"].to(torch.float64)
        self.trained = [None if t < 0 else bool(t) for t in state["trained"]]
        self.generator.set_state(state["generator"])
        self.draw_generator.set_state(state["draw_generator"])


def build_sampler(potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig | None = None, *,
                  generator: torch.Generator | None = None, **kwargs) -> FlowSampler | MixtureSampler:
    """
    One chain for ``potential_fn``: runs the mode search ``config.preconditioner`` asks for, then returns a
    :class:`MixtureSampler` with a component per mode when it found several separated ones
    (:meth:`~pyro_osds.ops.precondition.PreconditionConfig.wants_components`), else a :class:`FlowSampler`
    preconditioned from the search's result. ``kwargs`` go to the sampler (``num_steps``, ``hook_fn``,
    ``disable_progbar``, ``desc``).
    """
    config = OSDSConfig() if config is None else config
    init = torch.as_tensor(init)
    generator = seeded_generator(init.device) if generator is None else generator
    pre = config.preconditioner
    if pre.kind == "none" or pre.mode_search_starts == 0:
        return FlowSampler(potential_fn, init, config, generator=generator, **kwargs)
    ctx = kwargs.get("distributed")
    with stage_report(kwargs.get("desc", "OSDS"), f"mode search ({pre.mode_search_starts} starts per round)",
                      kwargs.get("disable_progbar", False)):
        search = None
        if ctx is None or ctx.is_main:
            search = pre.search(potential_fn, init.detach(), generator=generator)
    if ctx is not None:  # rank 0 searches; every rank takes its modes and its random stream
        search = from_rank_zero(search, generator, ctx)
        search = search._replace(modes=[(a.to(device=init.device), w) for a, w in search.modes])
    if pre.wants_components(search):
        return MixtureSampler(potential_fn, init, config, search, generator=generator, **kwargs)
    return FlowSampler(potential_fn, init, config, search=search, generator=generator, **kwargs)


def restore_sampler(potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig, state: dict, *,
                    generator: torch.Generator | None = None, **kwargs) -> FlowSampler | MixtureSampler:
    """The chain saved as ``state`` (:meth:`FlowSampler.state_dict` or :meth:`MixtureSampler.state_dict`),
    rebuilt without searching or fitting again."""
    if state.get("kind") == "mixture":
        modes = [(AffineMap(shift, tril), mass) for shift, tril, mass in state["modes"]]
        search = ModeSearch(modes, int(state["num_light"]), True, 0)
        sampler = MixtureSampler(potential_fn, init, config, search, generator=generator, **kwargs)
    else:
        sampler = FlowSampler(potential_fn, init, config, generator=generator, **kwargs)
    sampler.load_state_dict(state)
    return sampler
