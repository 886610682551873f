# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`Chain`: the contract every chain keeps (a sampler of a batched potential on :math:`\mathbb R^D` that
can be fitted, drawn from with exact weights, inverted, saved and restored), and what every chain shares: its
random streams, its draws (one loop, :func:`~pyro_osds.transports.draw`, over its transport), drawing shared
over a process group, evidence estimates and the check that its draws kept the modes it found.

A chain differs from another only in :meth:`Chain.fit` and :meth:`Chain.transport` (and what it saves); the
runner (:class:`~pyro_osds.OSDS`) sees nothing else.
"""

from __future__ import annotations

import abc
import math

import torch

from ..config import OSDSConfig
from ..cost import Cost, CostMeter
from ..distributed import DistributedContext, all_gather_rows, shard
from ..modes import ModeCheck, check_by_density, check_by_share
from ..ops.estimators import Estimates, ForwardEstimates, forward_evidence
from ..ops.precondition import SearchReport
from ..results import Draws
from ..transports import Transport, draw
from ..util import PotentialFn, check_positive_int, derive_seed, seeded_generator, tensor_on_its_device, warn

__all__ = ["Chain"]


class Chain(abc.ABC):
    r"""
    One chain: a trainable sampler for the batched potential ``potential_fn`` :math:`U = -\log\rho`
    (``(batch, dim) -> (batch,)``, differentiable by autograd).

    :param callable potential_fn: the potential.
    :param torch.Tensor init: a point ``(dim,)`` where the potential is finite (sets dtype and device, and starts
        the preconditioner's fit).
    :param OSDSConfig config: hyper-parameters (``config.evaluation.num_steps``: the step count the chain will be
        drawn with, which the one-step objective trains too).
    :param torch.Generator generator: randomness for training (default: seeded from the global RNG); draws use a
        second generator seeded from it, so drawing never changes training.
    :param DistributedContext distributed: train and draw across this process group (:mod:`pyro_osds.distributed`).
    :param CostMeter meter: counts what the chain spends (:mod:`pyro_osds.cost`; default: a new one); its
        potential is ``potential_fn`` counted by it.

    **What a chain must provide**: :meth:`fit`, :meth:`fit_preconditioner`, :meth:`transport`,
    :meth:`state_dict` / :meth:`load_state_dict`, the training state :attr:`interrupted`, :attr:`iteration`,
    :attr:`num_skipped` and :attr:`trained_step_counts`, and :meth:`_parts` (what it passes its process group to).
    It sets :attr:`report` (what its mode search found) when it fits its preconditioner.
    """

    #: pilot draws that decide whether an untrained map already fits (a mixture's components draw a quarter
    #: of it each to set the mixture weights)
    num_pilot = 1024

    def __init__(self, potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig | None = None, *,
                 generator: torch.Generator | None = None, distributed: DistributedContext | None = None,
                 meter: CostMeter | None = None):
        init = tensor_on_its_device(init)
        if init.dim() != 1 or not init.is_floating_point():
            raise ValueError(f"`init` must be a 1-D floating point tensor, got shape {tuple(init.shape)} "
                             f"and dtype {init.dtype}.")
        self.config = OSDSConfig() if config is None else config
        #: what the chain spent so far, per phase (:attr:`cost`)
        self.meter = CostMeter() if meter is None else meter
        self.potential_fn = self.meter.counted(potential_fn)
        self.init = init.detach().clone()
        self.dim = init.numel()
        # the potential is always evaluated in its own dtype (the flow may run in another)
        self.model_dtype, self.device = init.dtype, init.device
        self.generator = seeded_generator(self.device) if generator is None else generator
        # drawing has its own stream, so that sampling never perturbs (resumed) training
        self.draw_generator = seeded_generator(self.device, derive_seed(self.generator))
        # the diagnostic draws' stream: seeded from a copy of the drawing stream, which it leaves as it is (salted, so
        # that it is not the seed the next sharded draw derives from that stream)
        self._diagnostic_seed = (derive_seed(_copy_generator(self.draw_generator)) ^ 0x2545F4914F6CDD1D) % 2**62
        self._diagnostic_cache: dict[tuple, torch.Tensor] = {}
        self._num_fits = 0  # fit() calls so far: a new trained state each (the diagnostic draws' key)
        self._distributed = distributed
        #: what the mode search found and the preconditioner fit did (set when the preconditioner is fitted)
        self.report = SearchReport()

    # ------------------------------------------------------------------------------------------
    # the contract
    @abc.abstractmethod
    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """Fits the preconditioner (once) and trains ``num_iterations`` iterations (default: up to the budget,
        ``until`` first setting it); returns the training history."""

    @abc.abstractmethod
    def fit_preconditioner(self):
        """Runs the mode search and fits the preconditioner (once), setting :attr:`report`."""

    @abc.abstractmethod
    def transport(self, num_steps: int = 1, *, num_probes: int | None = None) -> Transport:
        """The chain's map from base draws to the potential's space, with ``num_steps`` steps."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume exactly or to draw again (tensors and plain Python values only)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict`."""

    @property
    @abc.abstractmethod
    def interrupted(self) -> bool:
        """Whether the last :meth:`fit` was stopped by ``KeyboardInterrupt``."""

    @property
    @abc.abstractmethod
    def iteration(self) -> int:
        """Completed training iterations."""

    @property
    @abc.abstractmethod
    def num_skipped(self) -> int:
        """Optimiser steps skipped as non-finite."""

    @property
    @abc.abstractmethod
    def trained_step_counts(self) -> tuple[int, ...] | None:
        """The flow step counts training optimises (``None``: every one)."""

    @abc.abstractmethod
    def _parts(self) -> list:
        """The parts that train and draw across this chain's process group (trainers, components)."""

    # ------------------------------------------------------------------------------------------
    # what every chain shares
    @property
    def distributed(self) -> DistributedContext | None:
        """The process group this chain trains and draws across (:mod:`pyro_osds.distributed`; ``None``: one
        process); setting it also sets its parts'."""
        return self._distributed

    @distributed.setter
    def distributed(self, ctx: DistributedContext | None) -> None:
        self._distributed = ctx
        for part in self._parts():
            part.distributed = ctx

    @property
    def out_of_time(self) -> bool:
        """Whether the last :meth:`fit` stopped when the run's time limit ran out (``max_time``)."""
        return any(getattr(part, "out_of_time", False) for part in self._parts())

    @property
    def cost(self) -> Cost:
        """What the chain spent so far: potential evaluations, network passes and seconds per phase
        (:mod:`pyro_osds.cost`)."""
        return self.meter.cost()

    @property
    def modes(self) -> list:
        """The separated modes the mode search found, ``[(centre, Laplace mass), ...]`` (empty for one)."""
        return list(self.report.modes)

    @property
    def mixture(self) -> tuple[torch.Tensor, list[float]] | None:
        """For a chain that is a mixture of flows: its components' locations ``(K, D)`` and mixture weights; else
        ``None``."""
        return None

    @property
    def too_many_modes(self) -> bool:
        """Whether the mode search found more modes than it could enumerate and the preconditioner does not spread
        over them (:attr:`~pyro_osds.ops.precondition.SearchReport.too_many_modes`)."""
        return self.report.too_many_modes

    def draw(self, num_samples: int, num_steps: int = 1, *, log_det: str | None = None,
             chunk_size: int | None = None, num_probes: int | None = None,
             generator: torch.Generator | None = None) -> Draws:
        """
        ``num_samples`` fresh weighted draws from the ``num_steps``-step map (:func:`~pyro_osds.transports.draw`).
        ``log_det="none"`` draws without weights (the potential is not evaluated; ``potential``, ``log_q`` and
        ``log_weight`` are NaN); ``num_probes`` sets the probes of the ``"hutchinson"`` volume (default
        ``config.evaluation.num_probes``); ``generator``: another random stream than the chain's drawing stream.
        """
        check_positive_int("num_samples", num_samples)
        self.config.process.step_codes(num_steps)
        evaluation = self.config.evaluation
        log_det = evaluation.default_log_det(self.dim) if log_det is None else log_det
        with self.meter.phase("drawing"):
            return draw(self.transport(num_steps, num_probes=num_probes), self.potential_fn, num_samples,
                        log_det=log_det, chunk_size=chunk_size or evaluation.chunk_size,
                        generator=self.draw_generator if generator is None else generator)

    def draw_sharded(self, num_samples: int, num_steps: int = 1, *, log_det: str | None = None,
                     generator: torch.Generator | None = None) -> Draws:
        """
        ``num_samples`` draws shared out over the process group (:mod:`pyro_osds.distributed`): each rank draws
        its share from its own stream (seeded from the chain's drawing stream, or ``generator``, and the rank) and
        every rank gets the union, in rank order, so that every estimate is computed on all the draws. One process:
        :meth:`draw`.
        """
        ctx = self.distributed
        if ctx is None:
            return self.draw(num_samples, num_steps, log_det=log_det, generator=generator)
        if num_samples < ctx.world_size:
            raise ValueError(f"`num_samples`={num_samples} is fewer than the {ctx.world_size} ranks drawing them.")
        rows = shard(num_samples, ctx)
        base = self.draw_generator if generator is None else generator
        stream = seeded_generator(self.device, (derive_seed(base) + ctx.rank) % 2**63)
        mine = self.draw(rows.stop - rows.start, num_steps, log_det=log_det, generator=stream)
        gather = lambda t: None if t is None else all_gather_rows(t, ctx)  # noqa: E731
        return Draws(gather(mine.x), gather(mine.potential), gather(mine.log_q), gather(mine.log_weight),
                     gather(mine.orientation), mine.log_det, component=gather(mine.component))

    def diagnostic_log_weights(self, num_steps: int = 1, log_det: str | None = None) -> torch.Tensor | None:
        """
        The log-weights of the chain's diagnostic draws: ``config.evaluation.diagnostic_draws`` weighted draws of the
        ``num_steps``-step map, made once per trained state (each :meth:`fit` starts a new one; saved with the chain)
        from a stream of their own, so they never change what :meth:`draw` draws. Evidence estimates read the weights'
        tail from them together with the draws' own (:func:`~pyro_osds.ops.estimators.evidence`'s ``reference``).
        ``None`` with ``diagnostic_draws=0``.
        """
        evaluation = self.config.evaluation
        num_draws = evaluation.diagnostic_draws
        if num_draws == 0:
            return None
        log_det = evaluation.default_log_det(self.dim) if log_det is None else log_det
        # the trained state (fits, iterations) and the settings that change the map drawn or the draws' number
        key = (num_steps, log_det, self._num_fits, self.iteration, num_draws, evaluation.dtype,
               self.config.optim.sample_with_ema, evaluation.num_probes)
        if key not in self._diagnostic_cache:
            stream = seeded_generator(self.device, self._diagnostic_seed)
            chunk = evaluation.chunk_size  # only the log-weights are kept
            log_w = torch.cat([self.draw_sharded(min(chunk, num_draws - start), num_steps, log_det=log_det,
                                                 generator=stream).log_weight.detach()
                               for start in range(0, num_draws, chunk)])
            self._diagnostic_cache = {key: log_w}  # the latest state's only
        return self._diagnostic_cache[key]

    def _start_fit(self) -> None:
        """Called by every :meth:`fit` first: what follows is a new trained state (mixture weights included)."""
        self._num_fits += 1
        self._diagnostic_cache = {}

    def log_q(self, x: torch.Tensor, num_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The chain's log density at given points ``x`` by the exact inverse of its map; returns ``(log_q, ok)``,
        ``ok`` marking the points whose inversion converged (with the majority orientation)."""
        self._require_density(num_steps)
        return self.transport(num_steps).log_prob(x)

    def evidence(self, num_samples: int = 2000, num_steps: int = 1, *, log_det: str | None = None) -> Estimates:
        """Evidence estimates from fresh draws (never the training batch)."""
        self._require_density(num_steps)
        return self.draw(num_samples, num_steps, log_det=log_det).evidence()

    def forward_evidence(self, target_samples: torch.Tensor, num_steps: int = 1) -> ForwardEstimates:
        r"""EUBO and forward :math:`\log\hat Z` from exact target draws, via the exact inverse map."""
        x = torch.as_tensor(target_samples, dtype=self.model_dtype, device=self.device)
        log_w, ok = self._log_weights_at(x, num_steps)
        if not bool(ok.all()):
            warn(f"The inverse map did not converge (or folded) for {int((~ok).sum())} of {ok.numel()} target "
                 "draws; they are excluded.", RuntimeWarning)
        return forward_evidence(log_w)

    def check_modes(self, draws: Draws, num_steps: int = 1) -> ModeCheck:
        """
        Whether ``draws`` (of the ``num_steps``-step map) kept the modes the mode search found
        (:mod:`pyro_osds.modes`): when the search enumerated them (or the preconditioner does not spread over
        modes it could not enumerate), by the draws' weighted share near each; when it found a sample of them and a
        marginal mixture spreads over them, by the chain's density at each found centre.
        """
        report = self.report
        if report.saturated or len(report.modes) < 2 or report.too_many_modes:
            return check_by_share(report.modes, draws)
        if self.config.method == "cdds" and num_steps != 1:
            return ModeCheck()  # no density to check with
        centres = torch.stack([c for c, _ in report.modes]).to(device=self.device, dtype=self.model_dtype)
        with self.meter.phase("drawing"):
            log_w, _ = self._log_weights_at(centres, num_steps)
        return check_by_density(report.modes, log_w, draws.evidence().log_z)

    def _log_weights_at(self, x: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log w, ok)`` at points ``x``: :math:`-U(x) - \\log q(x)` in float64 by the exact inverse, NaN where
        the inversion failed (``~ok``)."""
        log_q, ok = self.log_q(x, num_steps)
        with torch.no_grad():
            u = self.potential_fn(x)
        log_w = (-u.to(torch.float64)) - log_q.to(torch.float64)
        return torch.where(ok, log_w, torch.full_like(log_w, math.nan)), ok

    def _require_density(self, num_steps: int) -> None:
        if self.config.method == "cdds" and num_steps != 1:
            raise ValueError(
                "CDDS draws with num_steps > 1 re-noise between steps, so they have no tractable density and "
                "no importance weights; estimate the evidence with num_steps=1 (exact one-step weights)."
            )

    def _common_state(self) -> dict:
        """The random streams and the cost so far, which every chain saves."""
        return {"generator": self.generator.get_state(), "draw_generator": self.draw_generator.get_state(),
                "diagnostic_seed": self._diagnostic_seed, "cost": self.meter.state(),
                "num_fits": self._num_fits,
                "diagnostic_draws": [[list(key), log_w.cpu()] for key, log_w in self._diagnostic_cache.items()]}

    def _load_common_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.draw_generator.set_state(state["draw_generator"])
        self._diagnostic_seed = int(state.get("diagnostic_seed", self._diagnostic_seed))
        self._num_fits = int(state.get("num_fits", 0))
        self._diagnostic_cache = {tuple(key): log_w.to(self.device) for key, log_w in state.get("diagnostic_draws", ())}
        self.meter.load_state(state.get("cost"))


def _copy_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator on ``generator``'s device in its current state."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
