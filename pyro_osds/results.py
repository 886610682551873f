# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Named, immutable results: one chain's weighted :class:`Draws` and the pooled :class:`LogEvidence`
of a run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ops.estimators import Estimates, EvidenceError, evidence, pool_estimates
from .ops.integrate import count_folded

__all__ = ["Draws", "LogEvidence"]


class Draws(NamedTuple):
    r"""
    Weighted draws of one chain: ``x`` ``(N, D)`` in the potential's (unconstrained) space,
    ``potential`` :math:`U(x)`, ``log_q`` (the sampler's log density at ``x``), ``log_weight``
    :math:`= -U - \log q` (float64), ``orientation`` (the sign of the map's Jacobian determinant at each
    draw; exact volumes only, else ``None``), ``log_det`` (the volume method) and ``discrete`` (draws of
    a model's enumerated discrete sites given each ``x``, ``{site: (N, ...)}``, or ``None``).
    """

    x: torch.Tensor
    potential: torch.Tensor
    log_q: torch.Tensor
    log_weight: torch.Tensor
    orientation: torch.Tensor | None
    log_det: str
    discrete: dict | None = None

    @property
    def folded(self) -> torch.Tensor | None:
        """Draws whose Jacobian orientation differs from the majority's (the map folds there)."""
        return count_folded(self.orientation)

    @property
    def num_folded(self) -> int:
        folded = self.folded
        return 0 if folded is None else int(folded.sum())

    def evidence(self) -> Estimates:
        """The evidence estimates of these draws (:func:`~pyro_osds.ops.estimators.evidence`)."""
        if self.log_det == "none":
            raise EvidenceError(
                "These draws carry no importance weights: they were drawn without a volume (`log_det='none'`) or by "
                "a map without a tractable density (multi-step consistency sampling re-noises between steps). "
                "Draw with a volume (for CDDS, `num_steps=1`) to estimate the evidence."
            )
        return evidence(self.log_weight, num_folded=self.num_folded, log_det=self.log_det)


class LogEvidence(NamedTuple):
    r"""
    The log evidence of a run: the ``pooled`` :class:`~pyro_osds.ops.estimators.Estimates` of all draws
    (read its fields directly: ``ev.log_z``, ``ev.se``, ``ev.elbo``, ``ev.ess``, ``ev.k_hat``, ...),
    each chain's estimates in ``chains``, and the flow's ``num_steps`` :math:`K`. The pooled ``k_hat`` is
    the largest over chains; ``k_hat > 0.7`` means the estimate is unreliable, and ``num_folded`` counts
    draws where the flow folds (their weights are not exact).
    """

    pooled: Estimates
    chains: tuple[Estimates, ...]
    num_steps: int

    @classmethod
    def from_draws(cls, draws, num_steps: int) -> LogEvidence:
        """Per-chain and pooled estimates of a sequence of :class:`Draws` (one per chain)."""
        chains = tuple(d.evidence() for d in draws)
        pooled = pool_estimates([d.log_weight for d in draws], num_folded=sum(c.num_folded for c in chains),
                                log_det=draws[0].log_det)
        return cls(pooled, chains, num_steps)

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
        if p.num_folded:
            lines.append(f"  warning: the flow folds at {p.num_folded} draws; their weights are not exact")
        for i, c in enumerate(self.chains):
            lines.append(f"  chain {i}: log Z = {c.log_z:.4f} +- {c.se:.4f}, ELBO {c.elbo:.4f}, "
                         f"ESS {c.ess:.0f}/{c.num_draws}, k_hat {c.k_hat:.2f}")
        return "\n".join(lines)
