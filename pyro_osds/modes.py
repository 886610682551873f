# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
What is known about a target's modes, and what it tells the user: the warnings about the mode search's
findings (:func:`~pyro_osds.ops.precondition.find_modes`) and the check that a chain's draws kept the
modes it found. A sampler that loses a mode of Laplace mass :math:`m` gives a log evidence low by about
:math:`-\log(1 - m)`, which its importance weights cannot show.
"""

from __future__ import annotations

import math

import torch

from .objectives import ObjectiveConfig, multimodal_remedy
from .ops.precondition import lost_modes, mode_shares
from .results import Draws
from .util import warn

__all__ = ["UNCOVERED_LOG_RATIO", "lost_found_modes", "mode_coverage", "uncovered_modes", "warn_about_mode_search", "warn_lost_modes",
           "warn_uncovered_modes"]

#: a found mode whose centre has a weight this many nats above the estimate of :math:`Z` is uncovered
UNCOVERED_LOG_RATIO = math.log(100.0)


def warn_about_mode_search(info: dict, objective: ObjectiveConfig) -> None:
    """Warns when the mode search (its ``info`` from :func:`~pyro_osds.ops.precondition.choose_preconditioner`)
    found several separated modes, or one mode and further light local optima; the advice follows
    the training ``objective``."""
    light, modes = info.get("light_modes", 0), info.get("modes", ())
    if not info.get("saturated", True) and "marginal_mixture" in info:
        warn(f"The mode search kept finding new modes until its budget ran out ({len(modes)} modes after "
             f"{info.get('search_starts')} starts, {light} of them lighter than 1e-3 of the heaviest): too many to "
             "give each a mixture component "
             "(e.g. a product of independent multimodal factors). OSDS preconditions with a marginal mixture fitted "
             "to the weights (every coordinate split across its wells) and checks that the draws cover every mode "
             "found; modes split along no coordinate can still be missed, so check the evidence with an "
             "independent method if it matters.")
        return
    if not info.get("saturated", True):
        warn(f"The mode search kept finding new modes until its budget ran out ({max(len(modes), 1)} kept and "
             f"{light} lighter ones after {info.get('search_starts')} starts): the posterior has too many modes to "
             "give each a mixture component (e.g. a product of independent multimodal factors). OSDS fits one flow "
             "at the heaviest mode found, and reverse-KL training keeps few modes besides it: expect log Z to be "
             "low by the mass of the modes it drops, which the weights cannot show, so the evidence is marked "
             "unreliable. Check it with an independent method (tempered SMC, nested sampling).")
        return
    if info.get("num_modes") == 1 and light:
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


def mode_coverage(modes: list, draws: Draws) -> list[tuple[torch.Tensor, float, float]]:
    """
    For each of several separated ``modes`` (``[(centre, Laplace mass), ...]``; none for one): its
    location, its Laplace mass and the importance-weighted share of ``draws`` nearest to it
    (:func:`~pyro_osds.ops.precondition.mode_shares`). A share far below the mass means the sampler
    lost that mode.
    """
    if len(modes) < 2:
        return []
    centers = torch.stack([c for c, _ in modes]).to(draws.x.device)
    shares = mode_shares(draws.x, draws.log_weight, centers)
    return [(c, float(m), float(sh)) for (c, m), sh in zip(modes, shares, strict=True)]


def lost_found_modes(modes: list, draws: Draws) -> tuple[list, list[int]]:
    """:func:`mode_coverage` and the indices of the modes in it that ``draws`` have lost
    (:func:`~pyro_osds.ops.precondition.lost_modes`)."""
    coverage = mode_coverage(modes, draws)
    return coverage, lost_modes([m for _, m, _ in coverage], [sh for _, _, sh in coverage]) if coverage else []


def warn_lost_modes(modes: list, draws: Draws, objective: ObjectiveConfig, label: str = "") -> list[int]:
    """Warns (and returns their indices) about the ``modes`` of :func:`mode_coverage` that ``draws`` have
    lost (:func:`~pyro_osds.ops.precondition.lost_modes`), with the log Z deficit they imply."""
    coverage, lost = lost_found_modes(modes, draws)
    if lost:
        missing = sum(coverage[k][1] for k in lost)
        remedy = multimodal_remedy(objective)
        warn(f"{label}The draws carry almost no weight near {len(lost)} of the {len(coverage)} modes the mode "
             "search found (Laplace mass "
             + ", ".join(f"{coverage[k][1]:.2g} vs weighted share {coverage[k][2]:.2g}" for k in lost)
             + f"): the sampler has lost them, so log Z is probably low by about "
             f"{-math.log1p(-min(missing, 0.999)):.2g} nats and the posterior misses those modes. Retrain "
             "(another seed, more iterations)" + (f" or {remedy}." if remedy else "."), RuntimeWarning)
    return lost


def uncovered_modes(centre_log_weights: torch.Tensor, log_z: float,
                    threshold: float = UNCOVERED_LOG_RATIO) -> list[int]:
    r"""
    The found modes whose centres' importance weights :math:`\rho(c_m)/q(c_m)` (their logs,
    ``centre_log_weights``, by the exact inverse map) exceed :math:`\hat Z` by more than ``threshold`` nats:
    the sampler puts less than 1/100 of the density it should at their peaks, so the draws under-represent
    them (a missed mode's centre weight is astronomically large). The test for searches that could not
    enumerate the modes, where the found modes are a sample of them and draw shares nearest to each mean
    nothing; a point whose inversion failed (NaN) counts as uncovered. Measured on many-well 32-D with its
    marginal-mixture preconditioner: 0.2 to 0.6 nats above :math:`\log\hat Z` for the 128 modes found.
    """
    excess = centre_log_weights.to(torch.float64) - log_z
    return [int(i) for i in torch.nonzero(~(excess <= threshold)).flatten()]


def warn_uncovered_modes(uncovered: list[int], num_modes: int, label: str = "") -> None:
    """Warns about :func:`uncovered_modes`."""
    if uncovered:
        warn(f"{label}The draws under-represent {len(uncovered)} of the {num_modes} modes the mode search found "
             "(the sampler's density at their centres is below 1/100 of the target's): log Z is probably low and "
             "the posterior misses their mass. Check it with an independent method (tempered SMC, nested "
             "sampling).", RuntimeWarning)
