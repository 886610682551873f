# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The checks of a set of draws, computed once per set (:func:`check_draws`) into one :class:`DrawReport` that
:meth:`~pyro_osds.OSDS.sample` warns from and :meth:`~pyro_osds.OSDS.log_evidence`, the summaries and the ArviZ
attributes read: each chain's check that its draws kept the modes its mode search found
(:class:`~pyro_osds.modes.ModeCheck`; it inverts the map at every found mode, so it runs once), the draws where
the map folds, and the evidence with its verdict (:class:`~pyro_osds.results.LogEvidence`: the weights' tail, lost
modes, modes too many to enumerate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from .cost import Cost
from .modes import ModeCheck, warn_lost_modes
from .objectives import ObjectiveConfig
from .ops.estimators import K_HAT_THRESHOLD, nearly_constant, usable_log_weights
from .results import Draws, LogEvidence, UnreliableEvidenceWarning
from .util import warn

__all__ = ["DrawReport", "check_draws", "diagnostic_references", "warn_untrained_step_count"]


class DrawReport(NamedTuple):
    """
    What the checks of one set of ``draws`` (one :class:`~pyro_osds.results.Draws` per chain, of the
    ``num_steps``-step map) found: per chain, the :class:`~pyro_osds.modes.ModeCheck` of the modes its mode search
    found (``modes``), and the pooled and per-chain ``evidence`` (``None`` for draws without importance weights).
    """

    draws: tuple[Draws, ...]
    num_steps: int
    modes: tuple[ModeCheck, ...]
    evidence: LogEvidence | None

    @property
    def weighted(self) -> bool:
        """Whether the draws carry importance weights (not multi-step CDDS draws, nor ``log_det='none'``)."""
        return self.evidence is not None

    def log_evidence(self) -> LogEvidence:
        """The evidence, or the :class:`~pyro_osds.ops.estimators.EvidenceError` of draws without weights."""
        if self.evidence is None:
            next(d for d in self.draws if not d.weighted).evidence()  # raises EvidenceError, saying why
        return self.evidence

    def warn(self, objective: ObjectiveConfig) -> None:
        """Warns about what the checks found, chain by chain (lost modes, with the remedy for the training
        ``objective``; folds), then about a heavy tail of the pooled weights."""
        for chain, (draws, modes) in enumerate(zip(self.draws, self.modes, strict=True)):
            warn_lost_modes(modes, objective, f"Chain {chain}: ")
            if draws.num_folded:
                warn(f"Chain {chain}: the {self.num_steps}-step flow folds (its Jacobian changes orientation) at "
                     f"{draws.num_folded} of {draws.x.shape[0]} draws, so their importance weights are not exact. "
                     "Train longer or use more steps.", RuntimeWarning)
        if self.evidence is None or self.evidence.tail_ok:
            return
        pooled = self.evidence.pooled
        chains = ", ".join(f"chain {i} {c.k_hat:.2f}" for i, c in enumerate(self.evidence.chains))
        warn(f"The importance weights have a heavy tail: Pareto k-hat {pooled.k_hat:.2f} > {K_HAT_THRESHOLD} "
             f"({chains}; ESS/N {pooled.ess_per_draw:.2f}), so the variance of the weights is infinite and log Z's "
             "standard error understates its error (log Z tends to come out low). Train longer "
             "(`num_iterations`, or `continue_training()`), or check log Z with more draws or an independent "
             "method before comparing models.", UnreliableEvidenceWarning)


def warn_untrained_step_count(trained: tuple[int, ...] | None, num_steps: int) -> None:
    """Warns when draws of the ``num_steps``-step flow are asked for but training optimised only the ``trained``
    step counts (``None``: every one)."""
    if trained is not None and num_steps not in trained:
        warn(f"The {num_steps}-step flow was not trained (trained step counts: {trained}); its draws are still "
             "weighted exactly, but expect a poor ESS or folds. Train it with "
             f"`OSDS(..., num_steps={num_steps})` or `flow_kl_steps=(..., {num_steps})`, or use the paper's "
             "objective (`preset='paper-cpu'`), which trains every step size.")


def diagnostic_references(chains: Sequence, draws: Sequence[Draws], num_steps: int) -> list:
    """
    Per chain of ``chains``, the log-weights of its diagnostic draws
    (:meth:`~pyro_osds.samplers.Chain.diagnostic_log_weights`) where its ``draws`` need them, else ``None``: draws
    fewer than ``diagnostic_draws`` whose weights are not nearly constant (ESS/N below
    :data:`~pyro_osds.ops.estimators.NEAR_CONSTANT_ESS`, where the verdict does not read the tail).
    """
    references = []
    for chain, d in zip(chains, draws, strict=True):
        log_w = usable_log_weights(d.log_weight)
        wanted = (d.weighted and 0 < log_w.numel() < chain.config.evaluation.diagnostic_draws
                  and not nearly_constant(log_w))
        references.append(chain.diagnostic_log_weights(num_steps, d.log_det) if wanted else None)
    return references


def check_draws(chains: Sequence, draws: Sequence[Draws], num_steps: int, budget: str | None = None) -> DrawReport:
    """The :class:`DrawReport` of ``draws``, one per chain of ``chains`` (:class:`~pyro_osds.samplers.Chain`),
    drawn with ``num_steps`` steps (``budget``: what the evidence budget gave, for the evidence); the evidence
    reads the weights' tail from the chains' diagnostic draws too (:func:`diagnostic_references`)."""
    draws = tuple(draws)
    if not all(d.weighted for d in draws):
        return DrawReport(draws, num_steps, tuple(ModeCheck() for _ in draws), None)
    modes = tuple(chain.check_modes(d, num_steps) for chain, d in zip(chains, draws, strict=True))
    references = diagnostic_references(chains, draws, num_steps)  # before the cost, which counts them
    evidence = LogEvidence.from_draws(draws, num_steps, mixtures=[chain.mixture for chain in chains],
                                      num_lost_modes=sum(len(m.lost) for m in modes),
                                      too_many_modes=any(chain.too_many_modes for chain in chains), budget=budget,
                                      cost=Cost.sum(chain.cost for chain in chains), references=references)
    return DrawReport(draws, num_steps, modes, evidence)
