# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
What is known about a target's modes, and what it tells the user: the warnings about the mode search's findings
(a :class:`~pyro_osds.ops.precondition.SearchReport`) and the check that a chain's draws kept the modes it found
(a :class:`ModeCheck`). A sampler that loses a mode of Laplace mass :math:`m` gives a log evidence low by about
:math:`-\log(1 - m)`, which its importance weights cannot show.

The check has two tests (:mod:`~pyro_osds.ops.mode_search`): when the search enumerated the modes, the weighted
share of the draws nearest each mode against its Laplace mass (:func:`check_by_share`); when it found only a sample
of them, the sampler's density at each found centre against the target's (:func:`check_by_density`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .objectives import ObjectiveConfig, multimodal_remedy
from .ops.mode_search import lost_modes, mode_shares, uncovered_modes
from .ops.precondition import SearchReport
from .results import Draws
from .util import warn

__all__ = ["ModeCheck", "check_by_density", "check_by_share", "warn_about_mode_search", "warn_lost_modes"]


class ModeCheck(NamedTuple):
    """
    One chain's check that its draws kept the separated modes its mode search found: the modes' Laplace
    ``masses``, the weighted ``shares`` of the draws nearest each (the share test; ``None`` for the density test) and
    the ``lost`` modes, as indices. Empty for a chain with fewer than two modes (nothing to lose).
    """

    masses: tuple[float, ...] = ()
    shares: tuple[float, ...] | None = None
    lost: tuple[int, ...] = ()


def check_by_share(modes, draws: Draws) -> ModeCheck:
    """The share test for ``modes`` (``[(centre, Laplace mass), ...]``, all of the target's): a mode is lost when
    the importance-weighted share of ``draws`` nearest to it (:func:`~pyro_osds.ops.mode_search.mode_shares`) is far
    below its mass (:func:`~pyro_osds.ops.mode_search.lost_modes`)."""
    if len(modes) < 2:
        return ModeCheck()
    centres = torch.stack([c for c, _ in modes]).to(draws.x.device)
    masses = tuple(float(m) for _, m in modes)
    shares = tuple(float(s) for s in mode_shares(draws.x, draws.log_weight, centres))
    return ModeCheck(masses, shares, tuple(lost_modes(masses, shares)))


def check_by_density(modes, centre_log_weights: torch.Tensor, log_z: float) -> ModeCheck:
    r"""The density test for ``modes`` that are a sample of the target's: a mode is lost (under-represented) when
    the importance weight at its centre, :math:`\rho(c)/q(c)` (``centre_log_weights``, by the exact inverse map),
    exceeds :math:`\hat Z` (``log_z``) a hundredfold (:func:`~pyro_osds.ops.mode_search.uncovered_modes`)."""
    masses = tuple(float(m) for _, m in modes)
    return ModeCheck(masses, None, tuple(uncovered_modes(centre_log_weights, log_z)))


def warn_lost_modes(check: ModeCheck, objective: ObjectiveConfig, label: str = "") -> None:
    """Warns about the modes a :class:`ModeCheck` found lost, with the log Z deficit they imply and what to do
    (the remedy follows the training ``objective``); ``label`` starts the message (e.g. ``"Chain 0: "``)."""
    if not check.lost:
        return
    if check.shares is None:
        warn(f"{label}The draws under-represent {len(check.lost)} of the {len(check.masses)} modes the mode search "
             "found (the sampler's density at their centres is below 1/100 of the target's): log Z is probably low "
             "and the posterior misses their mass. Check it with an independent method (tempered SMC, nested "
             "sampling).", RuntimeWarning)
        return
    missing = sum(check.masses[k] for k in check.lost)
    remedy = multimodal_remedy(objective)
    warn(f"{label}The draws carry almost no weight near {len(check.lost)} of the {len(check.masses)} modes the mode "
         "search found (Laplace mass "
         + ", ".join(f"{check.masses[k]:.2g} vs weighted share {check.shares[k]:.2g}" for k in check.lost)
         + f"): the sampler has lost them, so log Z is probably low by about "
         f"{-math.log1p(-min(missing, 0.999)):.2g} nats and the posterior misses those modes. Retrain "
         "(another seed, more iterations)" + (f" or {remedy}." if remedy else "."), RuntimeWarning)


def warn_about_mode_search(report: SearchReport, objective: ObjectiveConfig) -> None:
    """Warns when the mode search (its :class:`~pyro_osds.ops.precondition.SearchReport`) found several separated
    modes, more than it could enumerate, or one mode and further light local optima; the advice follows the
    training ``objective``."""
    light, modes = report.num_light, report.modes
    if not report.saturated and report.marginal_mixture:
        warn(f"The mode search kept finding new modes until its budget ran out ({len(modes)} modes after "
             f"{report.num_starts} starts, {light} of them lighter than 1e-3 of the heaviest): too many to "
             "give each a mixture component "
             "(e.g. a product of independent multimodal factors). OSDS preconditions with a marginal mixture fitted "
             "to the weights (every coordinate split across its wells) and checks that the draws cover every mode "
             "found; modes split along no coordinate can still be missed, so check the evidence with an "
             "independent method if it matters.")
        return
    if not report.saturated:
        warn(f"The mode search kept finding new modes until its budget ran out ({max(len(modes), 1)} kept and "
             f"{light} lighter ones after {report.num_starts} starts): the posterior has too many modes to "
             "give each a mixture component (e.g. a product of independent multimodal factors). OSDS fits one flow "
             "at the heaviest mode found, and reverse-KL training keeps few modes besides it: expect log Z to be "
             "low by the mass of the modes it drops, which the weights cannot show, so the evidence is marked "
             "unreliable. Check it with an independent method (tempered SMC, nested sampling).")
        return
    if report.num_modes == 1 and light:
        warn(f"The mode search found {light} further local optima of the potential, each with less than 1e-3 "
             "of the main mode's Laplace mass. OSDS ignores them and is likely to miss them, which the "
             "importance weights cannot show. Alone each is negligible, but many light modes (e.g. a product "
             "of independent multimodal factors) can together hold much mass: check against another method "
             "if the model can be multimodal.")
    if len(modes) > 1:
        remedy = multimodal_remedy(objective)
        if remedy is not None:
            advice = ("The one-step objective (reverse KL) is mode-seeking: for multimodal targets "
                      f"{remedy}, and check the samples of each mode and the per-chain log Z.")
        else:
            advice = "Reverse-KL training can still drop modes: check the samples of each mode and the per-chain log Z."
        warn(f"The target has at least {len(modes)} separated modes (Laplace masses "
             + ", ".join(f"{w:.2g}" for _, w in modes)
             + "); a Gaussian preconditioner would hide all but one, so OSDS uses a broad Gaussian covering "
             "them. " + advice)
