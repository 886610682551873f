# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
What a run spent, per phase, so that samplers can be compared by cost as nested samplers' users do (``ncall``):
target-potential evaluations (points at which :math:`U` was evaluated; its gradients and Hessian-vector products
come from the same evaluation by autograd and are not counted again), network passes (points pushed through the
control network for one flow step, forward; backward passes not counted) and wall-clock seconds, in each of the
phases ``search`` (the mode search), ``preconditioner`` (its fit), ``training`` (pilot draws and the checks that
decide whether to train included) and ``drawing`` (draws, their weights and the checks of the draws; evaluations made
outside the other phases, e.g. :meth:`~pyro_osds.samplers.Chain.forward_evidence`, count here too).

A chain counts with its :class:`CostMeter` (the one mutable piece: it wraps the chain's potential and watches its
networks); :class:`Cost` and :class:`PhaseCost` are the records it reads into, and a run's cost is the sum over its
chains (:meth:`Cost.sum`; chains trained at once in threads or processes overlap in wall time, so their seconds add
up to more than the run took). Counting costs no device synchronisation: a batch's row count is known to the host.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

__all__ = ["Cost", "CostMeter", "PhaseCost"]


class PhaseCost(NamedTuple):
    """What one phase spent: wall-clock ``seconds``, ``potential_evaluations`` and ``network_passes`` (module
    docstring)."""

    seconds: float = 0.0
    potential_evaluations: int = 0
    network_passes: int = 0

    def plus(self, other: PhaseCost) -> PhaseCost:
        """Field by field sum."""
        return PhaseCost(*(a + b for a, b in zip(self, other, strict=True)))


class Cost(NamedTuple):
    """What a chain, or a run, spent in each phase (module docstring)."""

    search: PhaseCost = PhaseCost()
    preconditioner: PhaseCost = PhaseCost()
    training: PhaseCost = PhaseCost()
    drawing: PhaseCost = PhaseCost()

    @property
    def total(self) -> PhaseCost:
        """The sum over phases."""
        total = PhaseCost()
        for phase in self:
            total = total.plus(phase)
        return total

    @classmethod
    def sum(cls, costs: Iterable[Cost]) -> Cost:
        """The phase-by-phase sum of ``costs`` (e.g. a run's chains)."""
        result = cls()
        for cost in costs:
            result = cls(*(a.plus(b) for a, b in zip(result, cost, strict=True)))
        return result

    def as_dict(self) -> dict[str, float | int]:
        """Flat ``{"<phase>_<field>": value}`` (e.g. ``training_seconds``), with the totals as ``<field>``."""
        flat = {f"{phase}_{field}": value for phase, cost in zip(self._fields, self, strict=True)
                for field, value in zip(PhaseCost._fields, cost, strict=True)}
        return {**dict(zip(PhaseCost._fields, self.total, strict=True)), **flat}

    def __str__(self) -> str:
        total = self.total
        phases = ", ".join(f"{name} {cost.seconds:.1f} s" for name, cost in zip(self._fields, self, strict=True)
                           if cost != PhaseCost())
        return (f"{total.potential_evaluations:,} potential evaluations, {total.network_passes:,} network passes, "
                f"{total.seconds:.1f} s ({phases or 'nothing yet'})")


class CostMeter:
    """
    Counts what one chain spends (module docstring). :meth:`counted` wraps a potential so that every call counts
    its rows, :meth:`watch` counts the rows every network pass of a module pushes through ``module``'s
    :meth:`~pyro_osds.ops.nets.ControlNetwork.pass_counter` layer, and :meth:`phase` attributes what happens within
    it, and its wall time, to a phase; a phase entered within another is part of the outer one (a pilot draw in
    training is training).

    :param int evaluations_per_row: the model's potential evaluations in one row of the counted potential (a
        :class:`~pyro_osds.whitening.WhitenedTarget`'s rows each take its block's gradient rows; default 1).
    :param evaluations: where the number varies (the Laplace form's Newton steps stop once converged), a function
        returning the model evaluations of the calling thread's last call of the counted potential, read after each.
    """

    def __init__(self, evaluations_per_row: int = 1, evaluations: Callable[[], int] | None = None):
        self._totals = {name: [0.0, 0, 0] for name in Cost._fields}
        self._active: str | None = None
        self.evaluations_per_row = int(evaluations_per_row)
        self.evaluations = evaluations

    def cost(self) -> Cost:
        """What was spent so far."""
        return Cost(*(PhaseCost(float(s), int(p), int(n)) for s, p, n in self._totals.values()))

    def _add(self, index: int, rows: int) -> None:
        self._totals[self._active or "drawing"][index] += rows

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attributes the evaluations, passes and wall time within to phase ``name`` (unless a phase is active), and
        labels it ``osds:<name>`` for :mod:`torch.profiler`."""
        if name not in self._totals:
            raise ValueError(f"Unknown phase {name!r}; expected one of {list(self._totals)}.")
        if self._active is not None:
            yield
            return
        self._active, start = name, time.perf_counter()
        try:
            with torch.profiler.record_function(f"osds:{name}"):
                yield
        finally:
            self._totals[name][0] += time.perf_counter() - start
            self._active = None

    def counted(self, potential_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``potential_fn`` (batched, ``(batch, D) -> (batch,)``), counting the rows of every call."""
        def potential(z: torch.Tensor) -> torch.Tensor:
            if self.evaluations is not None:
                out = potential_fn(z)
                self._add(1, self.evaluations())
                return out
            self._add(1, (z.shape[0] if z.dim() > 1 else 1) * self.evaluations_per_row)
            return potential_fn(z)

        return potential

    def watch(self, net: torch.nn.Module) -> None:
        """Counts the rows of every pass through ``net`` (its copies, e.g. an EMA made by ``copy.deepcopy``, count
        too: the hook is copied with the module)."""
        def count(module, inputs, output):
            self._add(2, output.shape[0] if output.dim() > 1 else 1)

        net.pass_counter().register_forward_hook(count)

    def state(self) -> dict:
        """Plain numbers to save (checkpoints, chains trained in processes)."""
        return {name: list(phase) for name, phase in self._totals.items()}

    def load_state(self, state: dict | None) -> None:
        """Restores a :meth:`state` (``None``: a state saved before costs were counted; nothing to restore)."""
        if state is not None:
            self._totals = {name: list(state.get(name, (0.0, 0, 0))) for name in Cost._fields}
