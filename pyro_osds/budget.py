# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The evidence budget of a run: draw until the standard error of :math:`\log\hat Z` reaches ``target_se`` (at most
``max_draws`` draws in all), and stop training and drawing ``max_time`` seconds after the run started, keeping what
was reached and saying so (as nested samplers' ``dlogz``, ``maxcall`` and ``max_runtime`` do).

The standard error of :math:`\log\hat Z` from :math:`N` draws is :math:`\sqrt{(N/\mathrm{ESS} - 1)/N}`, so for a
given sampler it falls as :math:`1/\sqrt N`: from :math:`N` draws with standard error :math:`s`, about
:math:`N (s / s^\star)^2` reach :math:`s^\star` (:func:`draws_for`), drawn in further rounds until they do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ops.estimators import evidence
from .results import Draws
from .util import check_number, check_positive_int, warn

__all__ = ["BudgetConfig", "draw_to_target", "draws_for", "pooled_se"]


@dataclass(frozen=True)
class BudgetConfig:
    """
    The evidence budget (flat option names as the fields).

    :param float target_se: draw until the pooled standard error of log Z is at most this (``None``: the
        ``num_samples`` draws per chain only).
    :param int max_draws: the most draws in all, over the chains, while aiming at ``target_se`` (default: 100 times
        the first round's).
    :param float max_time: seconds from the start of ``fit`` (or ``continue_training``) after which training stops
        (every chain keeps its last iteration) and no further draws are made for ``target_se``.
    """

    target_se: float | None = None
    max_draws: int | None = None
    max_time: float | None = None

    def __post_init__(self):
        if self.target_se is not None:
            check_number("target_se", self.target_se, low=0, low_open=True)
        if self.max_draws is not None:
            check_positive_int("max_draws", self.max_draws)
        if self.max_time is not None:
            check_number("max_time", self.max_time, low=0, low_open=True)

    def deadline(self, start: float) -> float | None:
        """The wall-clock time (``time.time()``) at which a run started at ``start`` is out of time."""
        return None if self.max_time is None else start + self.max_time


def draws_for(se: float, num_draws: int, target_se: float) -> int:
    """The draws that take a standard error ``se`` of ``num_draws`` draws to ``target_se`` (a tenth more, so that
    one more round usually reaches it)."""
    if not se > target_se:
        return num_draws
    return math.ceil(1.1 * num_draws * (se / target_se) ** 2)


def pooled_se(draws: list[Draws], references: list | None = None) -> float:
    """The standard error of the pooled log Z of ``draws`` (one per chain): that of the union of their weights, as
    :func:`~pyro_osds.ops.estimators.pool_estimates` gives it (``references``: per chain, its diagnostic draws'
    log-weights or ``None``), without its per-chain tail fits."""
    given = [r for r in references or () if r is not None]
    return evidence(torch.cat([d.log_weight for d in draws]), reference=torch.cat(given) if given else None).se


def draw_to_target(draws: list[Draws], draw_more: Callable[[int], list[Draws]], budget: BudgetConfig,
                   deadline: float | None = None, references: list | None = None) -> tuple[list[Draws], str]:
    """
    ``draws`` (one :class:`~pyro_osds.results.Draws` per chain) with further draws until the standard error of the
    pooled log Z (:func:`pooled_se`, with the chains' diagnostic draws' ``references``) is at most
    ``budget.target_se``, every chain drawing as many more (``draw_more(n)``, a list per chain), within
    ``budget.max_draws`` and ``deadline``. Returns the draws and a sentence saying what the budget gave.
    """
    target = budget.target_se
    num_chains = len(draws)
    first = sum(d.x.shape[0] for d in draws)
    cap = budget.max_draws if budget.max_draws is not None else 100 * first
    se = pooled_se(draws, references)
    while True:
        total = sum(d.x.shape[0] for d in draws)
        if not se > target:
            return draws, f"target SE {target:g} reached: SE {se:.4g} from {total} draws"
        stop = ("the `max_draws` cap" if total >= cap
                else "`max_time` ran out" if deadline is not None and time.time() >= deadline else None)
        if stop is not None:
            note = f"target SE {target:g} not reached: SE {se:.4g} from {total} draws when {stop}"
            warn(f"The {note}. The estimate and its SE stand as they are; allow more draws or time, or train longer "
                 "(a better sampler needs fewer draws for the same SE).", RuntimeWarning)
            return draws, note
        more = -(-(min(draws_for(se, total, target), cap) - total) // num_chains)
        draws = [Draws.cat([d, new]) for d, new in zip(draws, draw_more(max(more, 1)), strict=True)]
        se = pooled_se(draws, references)
