# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`FlowSampler`: one chain as one flow, i.e. a trainable one-step diffusion sampler for a batched potential
on :math:`\mathbb R^D`, composed of a preconditioner (:func:`~pyro_osds.ops.precondition.choose_preconditioner`),
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
from collections.abc import Callable

import torch

from ..config import OSDSConfig
from ..cost import CostMeter
from ..distributed import DistributedContext, broadcast_object, from_rank_zero
from ..modes import warn_about_mode_search
from ..objectives import build_objective, consistency_stage, flow_kl_train_steps, resolve_flow_kl_gradient
from ..ops.affine import AffineMap, preconditioner_from_state, whiten_potential
from ..ops.em import em_log_weights
from ..ops.estimators import NEAR_CONSTANT_ESS, Estimates, evidence
from ..ops.marginal import MarginalMixtureMap
from ..ops.mode_search import ModeSearch
from ..ops.precondition import SearchReport, choose_preconditioner
from ..train import Trainer, stage_report
from ..transports import ConsistencyTransport, FlowTransport
from ..util import PotentialFn, check_positive_int, seeded_generator
from .base import Chain

__all__ = ["FlowSampler"]


class FlowSampler(Chain):
    r"""
    One chain as one flow (module docstring); the arguments are :class:`~pyro_osds.samplers.base.Chain`'s and:

    :param AffineMap preconditioner: use this affine map instead of fitting one.
    :param ModeSearch search: the mode search's result to fit the preconditioner from (default: the
        sampler runs its own when ``config.preconditioner.mode_search_starts > 0``).
    :param callable hook_fn: ``hook_fn(step, info)`` after every training iteration, with its statistics.
    :param callable on_iteration: ``on_iteration(step)`` after every training iteration, without them (they need
        not be read from the device then).
    :param bool disable_progbar: no progress bar.
    :param str desc: the progress bar's label.

    ``config.method == "cdds"`` trains a consistency function after its DIS teacher and draws with it; training
    across a process group supports the one-step objective only.
    """

    def __init__(
        self,
        potential_fn: PotentialFn,
        init: torch.Tensor,
        config: OSDSConfig | None = None,
        *,
        preconditioner: AffineMap | None = None,
        search: ModeSearch | None = None,
        start: AffineMap | None = None,
        generator: torch.Generator | None = None,
        hook_fn: Callable | None = None,
        on_iteration: Callable | None = None,
        disable_progbar: bool = False,
        desc: str = "OSDS",
        distributed: DistributedContext | None = None,
        meter: CostMeter | None = None,
    ):
        #: one trainer per training phase started so far
        self.trainers: list[Trainer] = []
        super().__init__(potential_fn, init, config, generator=generator, distributed=distributed, meter=meter)
        config = self.config
        # the network and flow run in `config.net.dtype` (default: the potential's); the potential is always
        # evaluated in its own dtype, on cast inputs, so any model works with a float32 flow
        self.dtype = config.net.torch_dtype(self.model_dtype)
        self.process = config.process
        # the step counts the one-step objective trains
        self._trained_steps = flow_kl_train_steps(config.objective.flow_kl, config.evaluation.num_steps)
        self.preconditioner = None if preconditioner is None else preconditioner.to(dtype=self.dtype)
        self.search = search
        #: a Gaussian the preconditioner's fit may start from (the target's, e.g. its parameterisation choice's fit)
        self.start = start
        #: the untrained map's pilot (stream seed, ELBO) and network state, kept from the start of a training
        #: until it ends (and in checkpoints), to give the network back if training lowered the pilot ELBO
        self.untrained: tuple[int, float, tuple] | None = None
        self.net = config.net.build(self.dim, dtype=self.dtype, device=self.device, generator=self.generator)
        self.meter.watch(self.net)
        self.hook_fn, self.on_iteration, self.disable_progbar, self.desc = hook_fn, on_iteration, disable_progbar, desc

    def _parts(self) -> list:
        return self.trainers

    # ------------------------------------------------------------------------------------------
    # preconditioning
    def fit_preconditioner(self) -> AffineMap:
        """Fits the preconditioner chosen by ``config.precondition`` (once) and sets :attr:`report`."""
        if self.preconditioner is None:
            with self.meter.phase("preconditioner"), stage_report(
                    self.desc, f"fitting the {self.config.preconditioner.kind!r} preconditioner", self.disable_progbar):
                affine, report = choose_preconditioner(self.potential_fn, self.init, self.config.preconditioner,
                                                       search=self.search, generator=self.generator,
                                                       starts=() if self.start is None else (self.start,))
            if self.distributed is not None:  # every rank takes rank 0's fit and random stream
                affine, report = self.from_rank_zero(affine, report)
            self.report = report
            warn_about_mode_search(report, self.config.objective)
            self.preconditioner = affine.to(dtype=self.dtype)
        return self.preconditioner

    def from_rank_zero(self, affine: AffineMap, report: SearchReport) -> tuple[AffineMap, SearchReport]:
        """Rank 0's preconditioner, its fit's report and its training stream's state, on every rank."""
        affine, report = from_rank_zero((affine, report), self.generator, self.distributed)
        return affine.to(device=self.device), report

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
        return resolve_flow_kl_gradient(setting, len(self.report.modes))

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
                                     flow_kl_steps=self._trained_steps, flow_kl_gradient=self.flow_kl_gradient)
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
        return (self.config.method == "osds" and self._trained_steps == (1,)
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
        initial drift) already fits the target: :attr:`num_pilot` fresh draws with weights so near constant
        (ESS/N >= :data:`~pyro_osds.ops.estimators.NEAR_CONSTANT_ESS`) that their tail does not matter, and an
        estimate that is :attr:`~pyro_osds.ops.estimators.Estimates.reliable`: a conjugate model's exact Gaussian
        preconditioner, a mixture component whose piece is Gaussian, a model whose whitened sites leave a Gaussian
        marginal. (At ESS/N >= 0.95 a Gaussian preconditioner of a 120-group hierarchy's skewed marginal of its
        location and scale passed with a pilot k-hat of 0.28-0.30 and its 4000 draws then had 0.54-0.69: flagged,
        where 200 iterations of training took them to 0.29-0.49 at ESS/N 0.9995.) Only for the one-step objective of
        one step count, whose untrained map this is; the pilot draws come from their own stream and leave the chain's draws alone (``pilot``: their
        estimates, if already made).
        """
        if not self._pilot_applies():
            return False
        est = self._pilot_estimate() if pilot is None else pilot
        fits = est.ess_per_draw >= NEAR_CONSTANT_ESS and est.reliable
        return fits if self.distributed is None else broadcast_object(fits, self.distributed)

    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """
        Fits the preconditioner (once) and trains every unfinished phase; returns the history of the
        last phase trained. ``num_iterations`` iterations of the first phase are run (default: up to its
        total, or less when early stopping is on: none when :meth:`fits_untrained`, and stopping on a
        plateau, :func:`~pyro_osds.objectives.plateau_stop`), and ``until`` first sets that total (the
        learning-rate schedule's horizon). With early stopping, a training from scratch that ends with a
        lower pilot ELBO than the untrained map's (the same base draws) gives the untrained network back:
        training never leaves the sampler worse than its preconditioner.
        """
        self._start_fit()
        self.fit_preconditioner()
        with self.meter.phase("training"):
            return self._train_phases(num_iterations, until)

    def _train_phases(self, num_iterations: int | None, until: int | None) -> dict[str, list]:
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
                    trainer.stop_reason = (f"the untrained map already fits (pilot ESS/N >= {NEAR_CONSTANT_ESS}, "
                                           "reliable weights)")
                else:
                    self.untrained = (seed, pilot.elbo, trainer.network_state())
            if phase == 0 and self.untrained is not None:
                trainer.baseline_elbo = self.untrained[1]
            desc = None if self.disable_progbar else (self.desc if phase == 0 else f"{self.desc} (consistency)")
            history = trainer.train(num_iterations if phase == 0 else None, hook_fn=self.hook_fn,
                                    on_iteration=self.on_iteration, desc=desc)
            if trainer.interrupted or trainer.out_of_time:
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
        return None if self.config.objective.trains_every_step_count else self._trained_steps

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

    def em_log_weights(self, num_samples: int, num_steps: int = 1, *, chunk_size: int | None = None) -> torch.Tensor:
        r"""Log-weights of stochastic EM paths with ``num_steps`` steps
        (:func:`~pyro_osds.ops.em.em_log_weights`; what breaks at few steps)."""
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
            **self._common_state(),
            "dim": self.dim,
            # the separated modes the mode search found (for the lost-mode check after loading)
            "modes": [(c.detach().clone(), float(m)) for c, m in self.report.modes],
            "saturated": bool(self.report.saturated),
            "untrained": self.untrained,
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"State is for dimension {state['dim']}, this sampler has dimension {self.dim}.")
        pre = state["preconditioner"]
        self.preconditioner = preconditioner_from_state(pre, dtype=self.dtype)
        self.report = SearchReport(modes=tuple((c, float(m)) for c, m in state["modes"]),
                                   saturated=bool(state["saturated"]),
                                   marginal_mixture=isinstance(self.preconditioner, MarginalMixtureMap))
        self.untrained = state.get("untrained")
        self.trainers = []
        for phase, trainer_state in enumerate(state["trainers"]):
            self.trainer_for(phase).load_state_dict(trainer_state)
        self._load_common_state(state)

