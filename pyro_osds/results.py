# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Named, immutable results: one chain's weighted :class:`Draws` and the pooled :class:`LogEvidence`
of a run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cost import Cost
from .ops.estimators import (
    K_HAT_THRESHOLD,
    Estimates,
    EvidenceError,
    evidence,
    kish_ess,
    pareto_k_hat,
    pool_estimates,
)
from .ops.integrate import count_folded

__all__ = ["ComponentEstimate", "Draws", "LogEvidence", "UnreliableEvidenceWarning"]


class UnreliableEvidenceWarning(RuntimeWarning):
    """New draws whose log-evidence estimate is not :attr:`~LogEvidence.reliable` because of its weights' tail
    (Pareto k-hat above :data:`~pyro_osds.ops.estimators.K_HAT_THRESHOLD`): its standard error understates the
    error. Filter it like any warning (``warnings.filterwarnings("ignore", category=UnreliableEvidenceWarning)``)."""


class Draws(NamedTuple):
    r"""
    Weighted draws of one chain: ``x`` ``(N, D)`` in the potential's (unconstrained) space,
    ``potential`` :math:`U(x)`, ``log_q`` (the sampler's log density at ``x``), ``log_weight``
    :math:`= -U - \log q` (float64), ``orientation`` (the sign of the map's Jacobian determinant at each
    draw; exact volumes only, else ``None``), ``log_det`` (the volume method), ``discrete`` (draws of
    a model's enumerated discrete sites given each ``x``, ``{site: (N, ...)}``, or ``None``) and, for a
    mixture sampler, the ``component`` that drew each draw (its ``log_q`` is the whole mixture's).
    """

    x: torch.Tensor
    potential: torch.Tensor
    log_q: torch.Tensor
    log_weight: torch.Tensor
    orientation: torch.Tensor | None
    log_det: str
    discrete: dict | None = None
    component: torch.Tensor | None = None

    @property
    def weighted(self) -> bool:
        """Whether the draws carry importance weights (not multi-step CDDS draws, nor ``log_det='none'``)."""
        return self.log_det != "none"

    @classmethod
    def cat(cls, parts) -> Draws:
        """The draws of ``parts`` (draws of one map, e.g. rounds of one chain), one after the other."""
        def join(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        first = parts[0]
        discrete = None if first.discrete is None else {k: torch.cat([p.discrete[k] for p in parts])
                                                         for k in first.discrete}
        return cls(join("x"), join("potential"), join("log_q"), join("log_weight"), join("orientation"), first.log_det,
                   discrete, join("component"))

    @property
    def folded(self) -> torch.Tensor | None:
        """Draws whose Jacobian orientation differs from the majority's (the map folds there)."""
        return count_folded(self.orientation)

    @property
    def num_folded(self) -> int:
        folded = self.folded
        return 0 if folded is None else int(folded.sum())

    def evidence(self, reference: torch.Tensor | None = None) -> Estimates:
        """The evidence estimates of these draws (:func:`~pyro_osds.ops.estimators.evidence`; ``reference``: the log-weights
        of further draws of the same map, their chain's diagnostic draws, which the tail is read from too)."""
        if not self.weighted:
            raise EvidenceError(
                "These draws carry no importance weights: they were drawn without a volume (`log_det='none'`) or by "
                "a map without a tractable density (multi-step consistency sampling re-noises between steps). "
                "Draw with a volume (for CDDS, `num_steps=1`) to estimate the evidence."
            )
        return evidence(self.log_weight, num_folded=self.num_folded, log_det=self.log_det, reference=reference)


class ComponentEstimate(NamedTuple):
    """
    One component of a chain that is a mixture (:class:`~pyro_osds.samplers.MixtureSampler`): the ``chain``
    and ``component`` index, the mode it sits at (``location``, flat unconstrained), its mixture
    ``weight``, the ``share`` of the chain's posterior mass its draws carry (their self-normalised weight),
    and the ``ess`` and ``k_hat`` of its own draws' weights, of which there are ``num_draws``.
    """

    chain: int
    component: int
    location: torch.Tensor
    weight: float
    share: float
    ess: float
    k_hat: float
    num_draws: int


class LogEvidence(NamedTuple):
    r"""
    The log evidence of a run: the ``pooled`` :class:`~pyro_osds.ops.estimators.Estimates` of all draws
    (read its fields directly: ``ev.log_z``, ``ev.se``, ``ev.elbo``, ``ev.ess``, ``ev.k_hat``, ...),
    each chain's estimates in ``chains``, the flow's ``num_steps`` :math:`K`, the mixture ``components``
    of chains that are mixtures (:class:`ComponentEstimate`), ``num_lost_modes``: modes the mode search
    found that the draws carry almost no weight near (the evidence then misses their mass), and
    ``too_many_modes``: whether the mode search of some chain kept finding separated modes until its
    budget ran out (too many to give each a component) and the chain has no marginal-mixture
    preconditioner (:mod:`pyro_osds.ops.marginal`; ``marginal_components=0`` or a ``"laplace"``
    preconditioner): the flow then covers a few modes, and the evidence misses the others' mass. With the
    marginal mixture, found modes that the draws under-represent count in ``num_lost_modes``. Each chain's ``k_hat``
    and the SE read the weights' tail from the draws together with the chain's diagnostic draws, where the runner
    makes them (:meth:`~pyro_osds.samplers.Chain.diagnostic_log_weights`); the pooled ``k_hat`` is
    the largest over chains (:func:`~pyro_osds.ops.estimators.pool_estimates` says why); :attr:`reliable` is the
    verdict (the weights' own diagnostics, :attr:`~pyro_osds.ops.estimators.Estimates.reliable`, no lost mode
    and no unenumerated modes). ``budget`` says what the run's evidence budget gave (:mod:`pyro_osds.budget`;
    ``None`` without one). ``cost`` is what the run had spent when the estimate was made: potential evaluations,
    network passes and seconds per phase, summed over chains (:class:`~pyro_osds.cost.Cost`).
    """

    pooled: Estimates
    chains: tuple[Estimates, ...]
    num_steps: int
    components: tuple[ComponentEstimate, ...] = ()
    num_lost_modes: int = 0
    too_many_modes: bool = False
    budget: str | None = None
    cost: Cost | None = None

    @classmethod
    def from_draws(cls, draws, num_steps: int, *, mixtures=None, num_lost_modes: int = 0,
                   too_many_modes: bool = False, budget: str | None = None, cost: Cost | None = None,
                   references=None) -> LogEvidence:
        """
        Per-chain and pooled estimates of a sequence of :class:`Draws` (one per chain); ``mixtures`` gives,
        per chain, ``(locations, weights)`` of its mixture components (or ``None`` for a single flow);
        ``num_lost_modes`` and ``too_many_modes`` are the mode checks' findings (class docstring); ``references``:
        per chain, its diagnostic draws' log-weights or ``None``
        (:func:`~pyro_osds.ops.estimators.pool_estimates`).
        """
        references = list(references) if references is not None else [None] * len(draws)
        chains = tuple(d.evidence(r) for d, r in zip(draws, references, strict=True))
        pooled = pool_estimates([d.log_weight for d in draws], num_folded=sum(c.num_folded for c in chains),
                                log_det=draws[0].log_det, references=references)
        components = []
        for chain, (d, mixture) in enumerate(zip(draws, mixtures or [None] * len(draws), strict=True)):
            if mixture is None or d.component is None:
                continue
            locations, weights = mixture
            share = torch.softmax(d.log_weight, 0)
            for k in range(len(weights)):
                mine = (d.component == k).to(d.log_weight.device)
                lw = d.log_weight[mine]
                ok = bool(mine.any())
                components.append(ComponentEstimate(
                    chain, k, locations[k], float(weights[k]), float(share[mine].sum()),
                    float(kish_ess(lw)) if ok else 0.0, pareto_k_hat(lw) if ok else float("nan"), int(mine.sum())))
        return cls(pooled, chains, num_steps, tuple(components), int(num_lost_modes), bool(too_many_modes), budget,
                   cost)

    @property
    def exact(self) -> bool:
        """Whether the weights are exact importance weights (:attr:`~pyro_osds.ops.estimators.Estimates.exact`)."""
        return self.pooled.exact

    @property
    def tail_ok(self) -> bool:
        """The pooled weights' tail is light enough for the SE to mean what it says
        (:attr:`~pyro_osds.ops.estimators.Estimates.tail_ok`)."""
        return self.pooled.tail_ok

    @property
    def reliable(self) -> bool:
        """The pooled estimate's own diagnostics are fine, no found mode was lost and the mode search
        enumerated the modes."""
        return self.pooled.reliable and self.num_lost_modes == 0 and not self.too_many_modes

    def __getattr__(self, name: str):
        if name in Estimates._fields:
            return getattr(self.pooled, name)
        raise AttributeError(f"'LogEvidence' object has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(object.__dir__(self)) | set(Estimates._fields))

    def __str__(self) -> str:
        p = self.pooled
        lines = [
            f"log Z = {p.log_z:.4f} +- {p.se:.4f} (ELBO {p.elbo:.4f}, ESS {p.ess:.0f}/{p.num_draws}, "
            f"k_hat {p.k_hat:.2f}; {self.num_steps}-step flow, {p.log_det} log-det)"
        ]
        if self.budget:
            lines.append(f"  budget: {self.budget}")
        if self.cost is not None:
            lines.append(f"  cost (summed over chains): {self.cost}")
        if not p.exact:
            lines.append(f"  warning: the {p.log_det!r} log-det is an approximation: the weights are not exact, the ELBO "
                         "is no bound and log Z is not consistent (draw with log_det='exact')")
        if p.num_folded:
            lines.append(f"  warning: the flow folds at {p.num_folded} draws; their weights are not exact")
        if not p.tail_ok:
            lines.append(f"  warning: k_hat {p.k_hat:.2f} > {K_HAT_THRESHOLD}: the weights' variance is infinite, so the "
                         "SE understates the error (log Z tends to come out low); train longer or check it "
                         "with an independent method")
        if self.num_lost_modes:
            lines.append(f"  warning: {self.num_lost_modes} mode(s) the mode search found carry almost no weight; "
                         "log Z misses their mass")
        if self.too_many_modes:
            lines.append("  warning: the mode search found more separated modes than it could enumerate; log Z "
                         "misses the mass of those the flow drops (check it with an independent method)")
        for i, c in enumerate(self.chains):
            lines.append(f"  chain {i}: log Z = {c.log_z:.4f} +- {c.se:.4f}, ELBO {c.elbo:.4f}, "
                         f"ESS {c.ess:.0f}/{c.num_draws}, k_hat {c.k_hat:.2f}")
            mine = [m for m in self.components if m.chain == i]
            for m in mine[:12]:
                where = ", ".join(f"{v:.3g}" for v in m.location.reshape(-1)[:4].tolist())
                more = ", ..." if m.location.numel() > 4 else ""
                lines.append(f"    component {m.component} at ({where}{more}): weight {m.weight:.3f}, share "
                             f"{m.share:.3f}, ESS {m.ess:.0f}/{m.num_draws}, k_hat {m.k_hat:.2f}")
            if len(mine) > 12:
                lines.append(f"    ... and {len(mine) - 12} more components")
        return "\n".join(lines)
