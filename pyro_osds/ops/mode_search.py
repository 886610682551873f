# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The separated modes of a target :math:`\rho = e^{-U}`: a multi-start search for them (:func:`search_modes`), the
partition of unity their Laplace fits define (:class:`LaplacePartition`), and the two tests of whether weighted
draws kept them: the weighted share of the draws nearest each mode (:func:`mode_shares`, :func:`lost_modes`) and
the importance weight at each mode's centre (:func:`uncovered_modes`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util import PotentialFn, raise_device_errors
from .affine import AffineMap, scale_from_hessian
from .jacobian import potential_and_score, potential_score_hessian

__all__ = ["UNCOVERED_LOG_RATIO", "LaplacePartition", "ModeSearch", "lost_modes", "mode_shares", "search_modes",
           "uncovered_modes"]

#: a found mode whose centre has a weight this many nats above the estimate of :math:`Z` is uncovered
UNCOVERED_LOG_RATIO = math.log(100.0)


class ModeSearch(NamedTuple):
    r"""
    Result of :func:`search_modes`: the separated ``modes`` as Laplace fits with their relative Laplace
    masses (``[(AffineMap, mass), ...]``, heaviest first, masses of the kept modes summing to one),
    ``num_light`` distinct optima dropped as lighter than ``min_mass``, ``saturated`` (whether the
    search stopped because new starts found no new mode, rather than by its budget), ``num_starts`` and, when
    the search is not saturated, the ``light`` modes themselves (``[(AffineMap, mass), ...]``, masses on the kept
    modes' scale): in a product of multimodal factors every mode is light next to the heaviest one found, yet
    together they show where each coordinate's wells are (:func:`~pyro_osds.ops.marginal.mixture_marginals`).
    """

    modes: list
    num_light: int
    saturated: bool
    num_starts: int
    light: tuple = ()


def _representatives(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """One row per cluster of rows within ``tolerance`` (max-norm) of each other, greedily in row order
    (non-finite rows dropped): the descents that ended in the same basin need one Newton polish."""
    kept: list[torch.Tensor] = []
    for row in x[torch.isfinite(x).all(-1)]:
        if not kept or float((torch.stack(kept) - row).abs().amax(-1).min()) > tolerance:
            kept.append(row)
    return torch.stack(kept) if kept else x[:0]


def _newton_direction(hessian: torch.Tensor, score: torch.Tensor, *, eigen_max_dim: int = 256
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The Newton step :math:`H^{-1}\nabla\log\rho = -H^{-1}\nabla U` per row, by Cholesky where :math:`H` is positive
    definite; elsewhere (saddles, maxima, flat directions) a descent direction: with :math:`|H|` (eigenvalues by
    magnitude, floored at :math:`10^{-8}\max|\lambda|`) up to ``eigen_max_dim`` dimensions, above it the score over
    :math:`|\operatorname{diag} H|` (an eigendecomposition per row costs :math:`O(D^3)`). Non-finite entries become
    zero. Returns ``(step, indefinite)``, the second marking the rows whose Hessian was not positive definite.
    """
    sym = 0.5 * (hessian + hessian.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(sym)
    step = torch.cholesky_solve(score.unsqueeze(-1), chol).squeeze(-1)
    finite = torch.isfinite(sym).all(-1).all(-1) & torch.isfinite(score).all(-1)
    indefinite = ((info != 0) | ~torch.isfinite(step).all(-1)) & finite
    for row in indefinite.nonzero().flatten().tolist():
        if sym.shape[-1] > eigen_max_dim:
            diagonal = sym[row].diagonal().abs()
            step[row] = score[row] / diagonal.clamp_min(1e-8 * float(diagonal.max().clamp_min(1e-12)))
            continue
        try:
            eigval, eigvec = torch.linalg.eigh(sym[row])
        except RuntimeError as err:  # eigh did not converge: no step for this row
            raise_device_errors(err)
            step[row] = 0.0
            continue
        floor = 1e-8 * eigval.abs().max().clamp_min(1e-12)
        step[row] = eigvec @ ((eigvec.T @ score[row]) / eigval.abs().clamp_min(floor))
    return torch.where(torch.isfinite(step) & finite.unsqueeze(-1), step, torch.zeros_like(step)), indefinite


def _damped_step(potential_fn: PotentialFn, x: torch.Tensor, u: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x + alpha * step`` per row, ``alpha`` halved (up to ten times) until the potential does not rise above
    ``u``; rows where no such ``alpha`` is found stay where they are."""
    alpha = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        for _ in range(10):
            candidate = potential_fn(x + alpha * step)
            worse = ~(candidate <= u + 1e-12 * u.abs().clamp_min(1.0))
            if not bool(worse.any()):
                break
            alpha = torch.where(worse.unsqueeze(-1), 0.5 * alpha, alpha)
    return torch.where((~worse).unsqueeze(-1), x + alpha * step, x)


def _descend(potential_fn: PotentialFn, x: torch.Tensor, *, scale: float, iterations: int = 300,
             newton_iterations: int = 20, read_every_iteration: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    Local minima of ``potential_fn`` from every row of ``x`` at once (rows do not interact): Adam with a
    step of ``scale / 20`` decaying to a hundredth; the end points that landed together are merged
    (:func:`_representatives`), brought together by Newton steps with the Hessian at the lowest of them, merged
    again and polished by damped Newton steps with the batched Hessian and a per-row backtracking line search
    (:func:`_newton_direction`, :func:`_damped_step`), merging after every step. Returns ``(points, potentials, hessians)``, one row per distinct end point;
    rows that did not converge to a finite minimum come back as NaN.
    """
    x = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=scale / 20)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations, eta_min=scale / 2000)
    previous = None
    # whether no row is finite any more: read every iteration on the CPU, where reading costs nothing, every 25 on
    # a GPU (``read_every_iteration`` None); in between the rows' gradients are masked, nothing selected (a batch
    # without a finite row then coasts on Adam's momentum until the read, where the CPU's stops at once)
    on_cpu = x.device.type == "cpu" if read_every_iteration is None else read_every_iteration
    for it in range(iterations):
        with torch.enable_grad():
            u = potential_fn(x)
            ok = torch.isfinite(u)
            if (on_cpu or it % 25 == 0) and not bool(ok.any()):
                break
            opt.zero_grad()
            torch.where(ok, u, torch.zeros_like(u)).sum().backward()
        if it % 25 == 0:  # every row has stopped improving: Newton takes it from here
            current = u.detach()
            if previous is not None and bool((((previous - current).abs() <= 1e-6 * (1 + current.abs())) | ~ok).all()):
                break
            previous = current
        with torch.no_grad():
            x.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        schedule.step()
    tolerance = scale / 200
    x = _representatives(x.detach(), tolerance=tolerance)
    # the descents that stopped apart in one basin: a Newton step with the Hessian at the lowest of them brings
    # them together (exactly, for a quadratic basin), so that one Hessian replaces one per descent
    for _ in range(3):
        if x.shape[0] <= 1:
            break
        u, score = potential_and_score(potential_fn, x)
        lowest = int(torch.argmin(torch.nan_to_num(u, nan=math.inf)))
        _, _, hessian = potential_score_hessian(potential_fn, x[lowest : lowest + 1])
        chol, info = torch.linalg.cholesky_ex(0.5 * (hessian[0] + hessian[0].T))
        if int(info) != 0:
            break
        step = torch.cholesky_solve(score.T, chol).T  # -H^-1 grad U = H^-1 score, every row
        merged = _representatives(_damped_step(potential_fn, x, u, step), tolerance=tolerance)
        if merged.shape[0] == x.shape[0]:
            break
        x = merged
    for it in range(newton_iterations):
        u, score, hessian = potential_score_hessian(potential_fn, x)
        step, indefinite = _newton_direction(hessian, score)
        if it >= 5 and bool(indefinite.any()):  # still not in a basin after five steps: no minimum to polish
            keep = ~indefinite
            x, u, step = x[keep], u[keep], step[keep]
            if x.shape[0] == 0:
                break
        x = _damped_step(potential_fn, x, u, step)
        if float(step.abs().amax()) < 1e-10 * (1.0 + float(x.abs().amax())):
            break
        x = _representatives(x, tolerance=tolerance)
    if x.shape[0] == 0:  # every descent left for a region without a minimum (e.g. a scale going to zero)
        return x, x.new_zeros(0), x.new_zeros(0, x.shape[-1], x.shape[-1])
    u, score, hessian = potential_score_hessian(potential_fn, x)
    # converged: a finite stationary point whose gradient is small relative to the potential's scale
    tol = 1e-3 * (u.abs() / x.shape[-1]).clamp_min(1.0)
    good = torch.isfinite(u) & (score.abs().amax(-1) < tol) & torch.isfinite(hessian).all(-1).all(-1)
    nan = torch.full_like(x, math.nan)
    return torch.where(good.unsqueeze(-1), x, nan), torch.where(good, u, torch.full_like(u, math.nan)), hessian


def search_modes(
    potential_fn: PotentialFn,
    init: torch.Tensor,
    *,
    starts_per_round: int = 64,
    initial_scale: float = 2.0,
    max_scale: float | None = None,
    max_starts: int = 2048,
    min_mass: float = 1e-3,
    same: float = 0.1,
    generator: torch.Generator | None = None,
    standard: torch.Tensor | None = None,
) -> ModeSearch:
    r"""
    A multi-start search for the separated modes of :math:`\rho = e^{-U}` around ``init``.

    Rounds of ``starts_per_round`` starts ``init + s N(0, I)`` (the first round's first start is ``init``)
    descend at once (Adam, then damped Newton
    with the batched Hessian) to local minima of :math:`U`; each converged minimum gets its Laplace fit
    :math:`N(m, H^{-1})` and its Laplace mass :math:`\propto e^{-U(m)}|\det L|`; a minimum within ``same``
    standard deviations (Mahalanobis, under its Laplace covariance) of one found before is that one again,
    and every other is a mode of its own, however close.
    The scale :math:`s` starts at ``initial_scale``; rounds at one scale repeat while they find new modes,
    and the scale doubles until a whole scale finds none (up to ``max_scale``, default
    ``2^10 initial_scale``), so modes far apart are found without knowing their spread. The search is
    *saturated* when it stops because new starts stopped finding new modes; it stops unsaturated after
    ``max_starts`` starts (e.g. a product of many bimodal factors, whose modes cannot be enumerated).

    ``standard``: coordinates (``long``) in which the potential is known to be :math:`\tfrac12 x_i^2` plus a function
    of the others (a conditionally Gaussian block in whitened coordinates,
    :attr:`~pyro_osds.target.FlatTarget.standard_coordinates`; for a block in its Laplace form, to second order):
    the search runs over the others with those at 0, and each mode's Laplace fit is the identity there, so its
    Hessians have the others' size (a 1000-group hierarchy's: 2 x 2, not 1002 x 1002). What the search returns
    only starts the preconditioner's fit: the weights never depend on it.

    :returns: :class:`ModeSearch`; modes lighter than ``min_mass`` times the heaviest are dropped and counted.
    """
    if standard is not None and 0 < standard.numel() < init.numel():
        return _search_given_standard(potential_fn, init, standard, starts_per_round=starts_per_round,
                                      initial_scale=initial_scale, max_scale=max_scale, max_starts=max_starts,
                                      min_mass=min_mass, same=same, generator=generator)
    max_scale = initial_scale * 2**10 if max_scale is None else max_scale
    init = init.detach()
    centres, trils, log_masses = [], [], []  # the distinct minima found so far
    num_starts, scale, saturated = 0, float(initial_scale), False
    while scale <= max_scale and num_starts < max_starts:
        new_at_scale = 0
        while num_starts < max_starts:
            noise = torch.randn((starts_per_round,) + tuple(init.shape), dtype=init.dtype, device=init.device,
                                generator=generator)
            starts = init + scale * noise
            if num_starts == 0:  # the initial point itself starts too (downhill from it lies the mode it is in)
                starts = torch.cat([init.unsqueeze(0), starts[:-1]])
            num_starts += starts_per_round
            points, potentials, hessians = _descend(potential_fn, starts, scale=scale)
            new = 0
            for k in torch.argsort(torch.nan_to_num(potentials, nan=math.inf)).tolist():
                if not math.isfinite(float(potentials[k])):
                    continue
                try:
                    tril = scale_from_hessian(hessians[k], diagonal=False)
                except RuntimeError as err:
                    raise_device_errors(err)
                    continue
                if centres:  # the same minimum again: within `same` standard deviations of one found before
                    diff = torch.linalg.solve_triangular(tril, (torch.stack(centres) - points[k]).T, upper=False)
                    if float((diff**2).sum(0).min()) <= same**2:
                        continue
                centres.append(points[k])
                trils.append(tril)
                log_masses.append(-float(potentials[k]) + float(tril.diagonal().abs().log().sum()))
                new += 1
            new_at_scale += new
            if new == 0:
                break
        if new_at_scale == 0 and scale > initial_scale:
            saturated = True
            break
        scale *= 2
    found = list(zip(centres, trils, log_masses, strict=True))
    if not found:
        return ModeSearch([], 0, saturated, num_starts)
    masses = torch.softmax(torch.tensor(log_masses, dtype=torch.float64, device="cpu"), 0)
    heaviest = float(masses.max())  # light is relative to the heaviest mode: 4096 equal modes are all kept
    is_kept = [float(w) >= min_mass * heaviest for w in masses]
    every = [(AffineMap(c, tril), float(w)) for (c, tril, _), w in zip(found, masses, strict=True)]
    kept = [mode for mode, keep in zip(every, is_kept, strict=True) if keep]
    total = sum(w for _, w in kept)
    modes = sorted(((a, w / total) for a, w in kept), key=lambda t: -t[1])
    light = () if saturated else tuple((a, w / total) for (a, w), keep in zip(every, is_kept, strict=True) if not keep)
    return ModeSearch(modes, len(found) - len(kept), saturated, num_starts, light)


def _search_given_standard(potential_fn: PotentialFn, init: torch.Tensor, standard: torch.Tensor,
                           **options) -> ModeSearch:
    """:func:`search_modes` over the coordinates outside ``standard`` (those held at 0), its modes embedded back:
    centres 0 and Laplace scales 1 on ``standard`` (lower triangular still: the others keep their order)."""
    dim = init.numel()
    keep = torch.ones(dim, dtype=torch.bool, device=init.device)
    keep[standard.to(init.device)] = False
    rest = torch.nonzero(keep).squeeze(-1)

    def reduced(s: torch.Tensor) -> torch.Tensor:
        return potential_fn(s.new_zeros(s.shape[:-1] + (dim,)).index_copy(-1, rest, s))

    def embedded(affine: AffineMap) -> AffineMap:
        tril = torch.eye(dim, dtype=affine.scale_tril.dtype, device=affine.scale_tril.device)
        tril[rest.unsqueeze(-1), rest] = affine.scale_tril
        return AffineMap(affine.shift.new_zeros(dim).index_copy(0, rest, affine.shift), tril)

    found = search_modes(reduced, init[rest], **options)
    return found._replace(modes=[(embedded(a), w) for a, w in found.modes],
                          light=tuple((embedded(a), w) for a, w in found.light))


class LaplacePartition:
    r"""
    A partition of unity from Laplace fits of separated modes: with fits :math:`N(m_k, L_kL_k^\top)`
    and masses :math:`w_k`,

    .. math:: s_k(x) = \frac{w_k N(x; m_k, L_kL_k^\top)}{\sum_j w_j N(x; m_j, L_jL_j^\top)},
        \qquad \sum_k s_k(x) = 1,

    i.e. each mode's responsibility under the Laplace mixture. :math:`Z = \sum_k \int \pi s_k`, and each
    piece :math:`\pi s_k` is unimodal around :math:`m_k` (a flow started there can fit it), so weighting
    the draws of component :math:`k` by :math:`\pi s_k / q_k` gives exact importance weights that need no
    other component's density (Veach's multiple importance sampling with weighting functions
    :math:`s_k`). Calling it on ``x`` ``(N, D)`` returns :math:`\log s_k(x)`, ``(M, N)``.
    """

    def __init__(self, modes: list[tuple[AffineMap, float]]):
        self.shifts = torch.stack([a.shift for a, _ in modes])
        self.trils = torch.stack([a.scale_tril for a, _ in modes])
        self.log_norms = torch.stack([a.log_abs_det for a, _ in modes])
        self.log_masses = torch.tensor([math.log(w) for _, w in modes], dtype=self.shifts.dtype,
                                       device=self.shifts.device)

    def __len__(self) -> int:
        return self.shifts.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.shifts.dtype)
        diff = (x.unsqueeze(0) - self.shifts.unsqueeze(1)).transpose(-1, -2)  # (M, D, N)
        z = torch.linalg.solve_triangular(self.trils, diff, upper=False)
        log_density = -0.5 * (z**2).sum(-2) - self.log_norms.unsqueeze(-1)  # up to the shared constant
        terms = self.log_masses.unsqueeze(-1) + log_density
        return terms - torch.logsumexp(terms, 0, keepdim=True)

    def restricted(self, potential_fn: PotentialFn, k: int) -> PotentialFn:
        r"""The potential of the piece :math:`\pi s_k`: :math:`U(x) - \log s_k(x)`."""

        def potential(x: torch.Tensor) -> torch.Tensor:
            return potential_fn(x) - self(x)[k].to(x.dtype)

        return potential


def mode_shares(x: torch.Tensor, log_weight: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    r"""
    Importance-weighted share of the draws ``x`` ``(N, D)`` nearest (Euclidean) to each of the
    ``centers`` ``(M, D)``: :math:`s_k = \sum_n \bar w_n [\arg\min_j \|x_n - c_j\| = k]`,
    :math:`\bar w = \operatorname{softmax}(\log w)`. Non-finite log-weights count as zero weight.
    """
    log_weight = torch.where(torch.isfinite(log_weight), log_weight, torch.full_like(log_weight, -math.inf))
    weights = torch.softmax(log_weight.to(torch.float64), 0)
    nearest = torch.cdist(x.to(torch.float64), centers.to(torch.float64)).argmin(-1)
    return torch.zeros(centers.shape[0], dtype=torch.float64, device="cpu").index_add_(0, nearest.cpu(), weights.cpu())


def lost_modes(masses, shares, *, min_mass: float = 0.05, ratio: float = 0.1) -> list[int]:
    """
    Indices of modes with Laplace ``masses`` of at least ``min_mass`` whose weighted sample ``shares``
    are below ``ratio`` times that mass: modes the sampler has (almost surely) lost. Laplace masses are
    approximate, hence the factor-of-ten margin.
    """
    return [k for k, (m, s) in enumerate(zip(masses, shares, strict=True)) if m >= min_mass and s < ratio * m]


def uncovered_modes(centre_log_weights: torch.Tensor, log_z: float,
                    threshold: float = UNCOVERED_LOG_RATIO) -> list[int]:
    r"""
    The found modes whose centres' importance weights :math:`\rho(c_m)/q(c_m)` (their logs,
    ``centre_log_weights``, by the exact inverse map) exceed :math:`\hat Z` by more than ``threshold`` nats:
    the sampler puts less than 1/100 of the density it should at their peaks, so the draws under-represent
    them (a missed mode's centre weight is astronomically large). The test for searches that could not
    enumerate the modes, where the found modes are a sample of them and draw shares nearest to each mean
    nothing; a point whose inversion failed (NaN) counts as uncovered.
    """
    excess = centre_log_weights.to(torch.float64) - log_z
    return [int(i) for i in torch.nonzero(~(excess <= threshold)).flatten()]
