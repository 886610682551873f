# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Conditional whitening of a block of coordinates in which the potential is quadratic (pure functions on flat
``(batch, D)`` tensors).

Split the flat vector into :math:`z = (s, x)`. When :math:`U(s, x)` is a quadratic function of :math:`x` for every
:math:`s` (a linear-Gaussian state-space model given its noise scales, Normal random effects with a Normal
likelihood given their scale, a Gaussian process given its hyper-parameters), the conditional posterior
:math:`p(x \mid s)` is exactly Gaussian, :math:`\mathcal N(m(s), H(s)^{-1})`, with :math:`H(s) = \nabla^2_x U` and
:math:`m(s) = x_0 - H(s)^{-1}\nabla_x U(s, x_0)` for any :math:`x_0`. The map

.. math::

    (s, \varepsilon) \mapsto (s,\ x),\qquad x = m(s) + C(s)^{-\top}\varepsilon,\qquad H(s) = C(s)C(s)^\top,

carries :math:`p(s)\,\mathcal N(\varepsilon; 0, I)` to the posterior, so the potential in :math:`(s, \varepsilon)`,

.. math::

    U'(s, \varepsilon) = U\bigl(s, x(s, \varepsilon)\bigr) - \log\left|\det \frac{\partial x}{\partial\varepsilon}
    \right| = U\bigl(s, x(s, \varepsilon)\bigr) + \sum_i \log C_{ii}(s),

is :math:`\tfrac12\lVert\varepsilon\rVert^2` plus a function of :math:`s` alone: what is left to learn is the
low-dimensional marginal of :math:`s`, without the funnel between a scale and the values it scales. The map is
triangular and invertible whatever :math:`m` and :math:`C` are, so :math:`U'` is an exact change of variables
(:math:`\log Z` unchanged) even where :math:`U` is not exactly quadratic: there the whitening is only less good.
The Gaussian conditional of a latent field given its hyper-parameters is INLA's [1], here an exact change of
variables rather than an approximation; [2] discusses such reparameterisations of hierarchical models.

:math:`H(s)` is read from gradient differences, :math:`H e_j = \nabla_x U(s, x_0 + e_j) - \nabla_x U(s, x_0)`
(exact for a quadratic; symmetrised), all gradients in one batched call of the potential; with a sparse :math:`H`
one difference serves each colour of columns that share no row (:func:`colour_columns`, [3]: three for a random
walk of any length); a row
whose :math:`H` is not positive definite (a block that is not quadratic there) takes :math:`C = I` and one gradient
step (none where the gradient is not finite or the step overflows), still an invertible map. Derivatives of :math:`U'` with respect to
:math:`s` go through :math:`m` and :math:`C` (second derivatives of :math:`U`), so training sees the whole map.

* :func:`conditional_gaussian`: :math:`m(s)` and :math:`C(s)` for a batch of :math:`s`;
* :func:`unwhiten` / :func:`whiten`: the map and its inverse (with the map's log-determinant);
* :func:`whitened_potential`: :math:`U'`;
* :func:`is_quadratic`: whether :math:`U` is quadratic in a block of coordinates (third differences along random
  directions at given points vanish to rounding).

**References**

[1] `Approximate Bayesian inference for latent Gaussian models by using integrated nested Laplace approximations`,
    H. Rue, S. Martino, N. Chopin (2009), JRSS B 71(2).

[2] `A General Framework for the Parametrization of Hierarchical Models`, O. Papaspiliopoulos, G. O. Roberts,
    M. Sköld (2007), Statistical Science 22(1).

[3] `On the estimation of sparse Jacobian matrices`, A. R. Curtis, M. J. D. Powell, J. K. Reid (1974), IMA Journal
    of Applied Mathematics 13(1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import small_cholesky

__all__ = ["WhiteningBlock", "block_diagonal", "colour_columns", "colour_symmetric", "conditional_gaussian",
           "independent_groups", "is_quadratic", "unwhiten", "whiten", "whitened_potential"]

PotentialFn = Callable[[torch.Tensor], torch.Tensor]

#: the cap on a Laplace block's Newton step, in conditional standard deviations :math:`H_{ii}^{-1/2}` (smooth, by
#: :math:`\tanh`): a step from far off the mode (a Poisson rate at a large count) moves at most this far
TRUST_RADIUS = 5.0
#: a row of a Laplace block stops its Newton steps once its step is below this many conditional standard deviations
#: (row by row, so a row's map does not depend on the rows it shares a batch with)
CONVERGED_STEP = 1e-9


@dataclass(frozen=True)
class WhiteningBlock:
    """The split :math:`z = (s, x)`: ``x_index`` the whitened coordinates, ``s_index`` the rest (both ``long``
    tensors on the target's device), ``x_ref`` :math:`x_0`, the point the gradients are taken at ``(d_x,)``, and
    the curvature's sparsity: ``pattern`` ``(d_x, d_x)`` (``True`` where :math:`H_{ij}` may be non-zero) and a
    ``colour`` per column (:func:`colour_columns`): one gradient difference per colour gives every column of it.
    ``groups`` :math:`n > 1`: the curvature is block diagonal, :math:`n` independent groups of :math:`k = d_x / n`
    coordinates each (:func:`independent_groups`; ``x_index`` in group order, the :math:`j`-th coordinate of every
    group coloured alike, by one colouring of the groups' patterns together), so it is read, factorised and solved
    as :math:`n` matrices :math:`k \times k`: a plate of random effects given their hyper-parameters costs
    :math:`O(d_x)`, not :math:`O(d_x^3)`."""

    s_index: torch.Tensor
    x_index: torch.Tensor
    x_ref: torch.Tensor
    pattern: torch.Tensor
    colour: torch.Tensor
    newton_steps: int = 1
    difference_step: float = 1.0
    dense: torch.Tensor | None = None
    groups: int = 1

    @classmethod
    def of(cls, dim: int, x_index, x_ref: torch.Tensor, pattern: torch.Tensor | None = None, *,
           newton_steps: int = 1) -> WhiteningBlock:
        r"""The block of ``x_index`` in ``dim`` coordinates; ``pattern`` ``None``: a dense curvature.
        ``newton_steps`` 1: a quadratic block (gradient differences of unit step, exact there); more: the Laplace
        form of a block that is not quadratic (forward differences of step :math:`h = \epsilon^{1/3}` of the dtype:
        their truncation error is :math:`O(h)`, their rounding :math:`O(\epsilon/h)`, and training differentiates
        them once more, so a step above :math:`\sqrt\epsilon` keeps that rounding small)."""
        device = x_ref.device
        x_index = torch.as_tensor(list(x_index), dtype=torch.long, device=device)
        keep = torch.ones(dim, dtype=torch.bool, device=device)
        keep[x_index] = False
        dx = x_index.numel()
        if pattern is None:
            pattern = torch.ones(dx, dx, dtype=torch.bool, device=device)
        pattern = pattern.to(device) | pattern.to(device).T | torch.eye(dx, dtype=torch.bool, device=device)
        step = 1.0 if newton_steps == 1 else float(torch.finfo(x_ref.dtype).eps) ** (1.0 / 3.0)
        s_index = torch.nonzero(keep).squeeze(-1)
        order, groups = independent_groups(pattern)
        if groups > 1:  # a cross-group zero stays zero in the Cholesky factor: the same map, group by group
            order, size = order.to(device), dx // groups
            pattern = pattern[order][:, order]
            # one colouring of the groups' patterns together serves them all: two columns of one group share a colour
            # only if they share no row in any group (two random walks: three colours, not their length)
            colour = colour_columns(_within_groups(pattern, groups, size).any(0)).repeat(groups)
            return cls(s_index, x_index[order], x_ref.detach()[order], pattern, colour, newton_steps, step, None,
                       groups)
        colour, dense = colour_symmetric(pattern)
        return cls(s_index, x_index, x_ref.detach(), pattern, colour, newton_steps, step,
                   dense if bool(dense.any()) else None)

    @property
    def num_colours(self) -> int:
        """The gradient differences one reading of :math:`H` takes (one per colour)."""
        return int(self.colour.max()) + 1 if self.colour.numel() else 0

    @property
    def group_size(self) -> int:
        """:math:`k`, the coordinates of each independent group (all of them for a connected curvature)."""
        return self.x_index.numel() // self.groups


def block_diagonal(factors: torch.Tensor) -> torch.Tensor:
    """The ``(B, n, k, k)`` matrices of each row's groups as one block-diagonal matrix ``(B, n k, n k)`` (the block's
    order, :attr:`WhiteningBlock.x_index`)."""
    batch, groups, size = factors.shape[:3]
    out = factors.new_zeros(batch, groups, size, groups, size)
    out.diagonal(dim1=1, dim2=3).copy_(factors.permute(0, 2, 3, 1))
    return out.reshape(batch, groups * size, groups * size)


def independent_groups(pattern: torch.Tensor) -> tuple[torch.Tensor, int]:
    """
    The connected components of a symmetric sparsity ``pattern`` ``(d, d)``: ``(order, n)``, the coordinates ordered
    by component (components by their first coordinate, each in its own order) and their number, when there are
    several and all have the same size (a plate of conditionally independent random effects, or of vectors of them);
    else ``(arange(d), 1)``. A Cholesky factor has no fill-in between components, so a block-diagonal curvature is
    factorised group by group with the same result.
    """
    dx = pattern.shape[0]
    parent = list(range(dx))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = torch.nonzero(torch.triu(pattern, 1), as_tuple=True)
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is the component's first coordinate
    members: dict[int, list[int]] = {}
    for i in range(dx):
        members.setdefault(root(i), []).append(i)
    if len(members) < 2 or len({len(m) for m in members.values()}) != 1:
        return torch.arange(dx, device=pattern.device), 1
    order = [i for first in sorted(members) for i in members[first]]
    return torch.tensor(order, device=pattern.device), len(members)


def colour_columns(pattern: torch.Tensor) -> torch.Tensor:
    r"""
    A greedy colouring of the columns of a sparsity ``pattern`` ``(d, d)`` in which two columns share a colour only
    if no row has a non-zero in both (Curtis, Powell & Reid 1974): the sum of a colour's unit vectors,
    :math:`H\sum_{j \in c} e_j`, then holds each column :math:`j \in c` in the rows where it is non-zero. A banded
    curvature (a random walk) takes three colours whatever its size, a dense one ``d``. Returns ``(d,)`` ``long``.
    """
    dx = pattern.shape[0]
    colour = torch.empty(dx, dtype=torch.long, device=pattern.device)
    rows_of: list[torch.Tensor] = []  # the rows a colour's columns already occupy
    for j in range(dx):
        for c, rows in enumerate(rows_of):
            if not bool((rows & pattern[:, j]).any()):
                colour[j] = c
                rows_of[c] = rows | pattern[:, j]
                break
        else:
            colour[j] = len(rows_of)
            rows_of.append(pattern[:, j].clone())
    return colour


def colour_symmetric(pattern: torch.Tensor, *, max_dense: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    A colouring of a symmetric sparsity ``pattern`` ``(d, d)`` that reads the rows of a few *dense* columns (a
    hierarchy's location, coupled to every effect it centres) from those columns themselves: each dense column has a
    colour of its own, which gives :math:`H_{ij}` for every row :math:`i`, and so :math:`H_{ji}` by symmetry; the
    other columns are coloured by :func:`colour_columns` on the rows that are not dense. An arrow (one location and
    its effects) then takes two colours instead of :math:`d`. The dense columns are the ``k`` of highest degree for
    the ``k <= max_dense`` that gives the fewest colours (``k = 0``, plain :func:`colour_columns`, unless fewer).
    Returns ``(colour, dense)``: ``(d,)`` ``long`` and ``(d,)`` ``bool``.
    """
    dx = pattern.shape[0]
    best_colour, best_dense = colour_columns(pattern), torch.zeros(dx, dtype=torch.bool, device=pattern.device)
    order = torch.argsort(pattern.sum(0), descending=True, stable=True)
    for k in range(1, min(max_dense, dx - 1) + 1):
        if k + 1 >= int(best_colour.max()) + 1:  # no fewer colours possible
            break
        dense = torch.zeros(dx, dtype=torch.bool, device=pattern.device)
        dense[order[:k]] = True
        rest = torch.nonzero(~dense).squeeze(-1)
        colour = torch.empty(dx, dtype=torch.long, device=pattern.device)
        colour[order[:k]] = torch.arange(k, device=pattern.device)
        colour[rest] = k + colour_columns(pattern[rest][:, rest])
        if int(colour.max()) < int(best_colour.max()):
            best_colour, best_dense = colour, dense
    return best_colour, best_dense


def _assemble(block: WhiteningBlock, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The flat ``(..., D)`` vector with ``s`` and ``x`` at their coordinates."""
    dim = block.s_index.numel() + block.x_index.numel()
    z = s.new_zeros(s.shape[:-1] + (dim,))
    z = z.index_copy(-1, block.s_index, s) if block.s_index.numel() else z
    return z.index_copy(-1, block.x_index, x)


def _gradient_and_curvature(potential_fn: PotentialFn, s: torch.Tensor, x: torch.Tensor, block: WhiteningBlock, *,
                            create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\nabla_x U(s, x)` ``(B, d_x)`` and the symmetrised :math:`H(s, x)`, group by group ``(B, n, k, k)``
    (``n = block.groups``), from gradient differences of step ``block.difference_step``, one per colour, all gradients
    in one batched call."""
    batch, dx, colours = s.shape[0], block.x_index.numel(), block.num_colours
    dtype, device = block.x_ref.dtype, block.x_ref.device
    seeds = (block.colour == torch.arange(colours, device=device).unsqueeze(-1)).to(dtype)  # (colours, d_x)
    offsets = torch.cat([torch.zeros(1, dx, dtype=dtype, device=device), seeds])
    with torch.enable_grad():
        if block.newton_steps == 1:  # the quadratic block: unit differences at x_0 (as first released)
            points = (x + offsets).expand(batch, colours + 1, dx).detach().requires_grad_(True)
        else:
            points = x.unsqueeze(1) + block.difference_step * offsets
            if not points.requires_grad:
                points = points.detach().requires_grad_(True)
        rows = _assemble(block, s.unsqueeze(1).expand(batch, colours + 1, s.shape[-1]), points)
        (grads,) = torch.autograd.grad(potential_fn(rows.reshape(batch * (colours + 1), -1)).sum(), points,
                                       create_graph=create_graph)
    grads = grads.reshape(batch, colours + 1, dx)
    g0 = grads[:, 0]
    differences = grads[:, 1:] - g0.unsqueeze(1)  # (B, colours, d_x): H times each colour's seed
    if block.newton_steps != 1:
        differences = differences / block.difference_step
    if block.groups > 1:  # H_{gi, gj} is row gi of column j's colour's difference (the colour of j in every group)
        groups, size = block.groups, block.group_size
        hessian = differences.reshape(batch, colours, groups, size)[:, block.colour[:size]].permute(0, 2, 3, 1)
        hessian = hessian * _within_groups(block.pattern, groups, size)
    else:
        hessian = differences[:, block.colour].transpose(-1, -2)  # H_ij from column j's colour, row i
        if block.dense is not None:  # a dense row i from its own column, by symmetry (colour_symmetric)
            hessian = torch.where(block.dense.unsqueeze(-1), hessian.transpose(-1, -2), hessian)
        hessian = (hessian * block.pattern).unsqueeze(1)
    return g0, 0.5 * (hessian + hessian.transpose(-1, -2))


def _within_groups(pattern: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """The diagonal blocks ``(n, k, k)`` of a pattern ``(n k, n k)`` in group order."""
    return pattern.reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _gradient(potential_fn: PotentialFn, s: torch.Tensor, x: torch.Tensor, block: WhiteningBlock, *,
              create_graph: bool) -> torch.Tensor:
    r""":math:`\nabla_x U(s, x)` ``(B, d_x)``, differentiable in ``s`` and ``x`` when ``create_graph``."""
    with torch.enable_grad():
        points = x if x.requires_grad else x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(potential_fn(_assemble(block, s, points)).sum(), points, create_graph=create_graph)
    return grad


def _grouped(v: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    """``(B, d_x)`` -> ``(B, n, k)``, group by group."""
    return v.reshape(v.shape[0], block.groups, block.group_size)


def _cholesky_ex(hessian: torch.Tensor, block: WhiteningBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`torch.linalg.cholesky_ex` of each group's curvature; many small groups entry by entry
    (:mod:`~pyro_osds.ops.small_cholesky`, a LAPACK call per matrix costing more than the arithmetic)."""
    return small_cholesky.cholesky_ex(hessian) if block.groups > 1 else torch.linalg.cholesky_ex(hessian)


def _solve(chol: torch.Tensor, v: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    """:math:`H^{-1} v` ``(B, d_x)`` for ``H = chol chol^T`` group by group."""
    if block.groups > 1:
        return small_cholesky.cholesky_solve(chol, _grouped(v, block)).reshape(v.shape)
    return torch.cholesky_solve(v.unsqueeze(-1), chol[:, 0]).reshape(v.shape)


def _solve_transposed(chol: torch.Tensor, v: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    """:math:`C^{-T} v` ``(B, d_x)`` group by group."""
    if block.groups > 1:
        return small_cholesky.solve_lower_transposed(chol, _grouped(v, block)).reshape(v.shape)
    return torch.linalg.solve_triangular(chol[:, 0].transpose(-1, -2), v.unsqueeze(-1), upper=True).reshape(v.shape)


def _times_transposed(chol: torch.Tensor, v: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    """:math:`C^T v` ``(B, d_x)`` group by group."""
    if block.groups > 1:
        return (chol * _grouped(v, block).unsqueeze(-1)).sum(-2).reshape(v.shape)
    return (chol[:, 0].transpose(-1, -2) @ v.unsqueeze(-1)).reshape(v.shape)


def _per_coordinate(flags: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    """Flags of the groups ``(B, n)`` -> of their coordinates ``(B, d_x)``."""
    return flags.repeat_interleave(block.group_size, dim=-1)


def _factor(hessian: torch.Tensor, gradient: torch.Tensor, eye: torch.Tensor, block: WhiteningBlock
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factor of each group's curvature ``(B, n, k, k)`` and the groups where it failed or their
    gradient is not finite (``(B, n)``), whose factor is the identity (their curvature replaced before a
    factorisation with derivatives, whose backward pass would otherwise meet the failed factor)."""
    with torch.no_grad():
        chol, info = _cholesky_ex(hessian, block)
        bad = (info != 0) | ~torch.isfinite(chol).flatten(2).all(-1) | ~torch.isfinite(_grouped(gradient, block)).all(-1)
    if hessian.requires_grad:
        return _cholesky_ex(torch.where(bad[..., None, None], eye, hessian), block)[0], bad
    return torch.where(bad[..., None, None], eye, torch.nan_to_num(chol)), bad


def conditional_gaussian(potential_fn: PotentialFn, s: torch.Tensor, block: WhiteningBlock, *,
                         create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    :math:`m(s)` ``(B, d_x)`` and the lower Cholesky factor :math:`C(s)` of :math:`H(s)`, group by group
    ``(B, n, k, k)`` (:attr:`WhiteningBlock.groups`; ``n = 1`` for a connected curvature), for a batch of ``s``
    ``(B, d_s)`` (module docstring), differentiable in ``s`` when ``create_graph``. A block with
    ``newton_steps`` :math:`K > 1` takes the Laplace form of a block that is not quadratic: up to :math:`K` damped
    Newton steps from :math:`x_0` (fewer once every row has converged, :data:`CONVERGED_STEP`),
    :math:`m_{k+1} = m_k - \alpha_k H(m_k)^{-1}\nabla_x U(m_k)` with :math:`\alpha_k = \tanh(\rho_k)/\rho_k`,
    :math:`\rho_k` the 8-norm of each group's Newton step in units of :data:`TRUST_RADIUS` conditional standard
    deviations :math:`H_{ii}^{-1/2}` (a smooth cap on a step far from the mode), without derivatives; then one full
    step :math:`m = m_K - H(m_{K-1})^{-1}\nabla_x U(s, m_K)` with derivatives in :math:`s` (at the mode they are the
    implicit function theorem's, :math:`dm/ds = -H^{-1}\partial_s\nabla_x U`, whatever the iterates did) and
    :math:`C` the factor of :math:`H(s, m)`. The map is exact whatever the steps reach; only the derivatives assume
    the mode reached. A group whose curvature is not positive definite (or gradient not finite) at an iterate takes
    no step there, and :math:`C = I` where it is not at :math:`m`.
    """
    batch, dx = s.shape[0], block.x_index.numel()
    groups, size = block.groups, block.group_size
    dtype, device = block.x_ref.dtype, block.x_ref.device
    eye = torch.eye(size, dtype=dtype, device=device).expand(batch, groups, size, size)
    if block.newton_steps == 1:
        g0, hessian = _gradient_and_curvature(potential_fn, s, block.x_ref, block, create_graph=create_graph)
        chol, info = _cholesky_ex(hessian, block)
        bad = (info != 0) | ~torch.isfinite(chol).flatten(2).all(-1)
        if bool(bad.any()):  # not positive definite there: one gradient step and C = I, still an invertible map
            chol = torch.where(bad[..., None, None], eye, torch.nan_to_num(chol))
            g0 = torch.nan_to_num(g0, nan=0.0, posinf=0.0, neginf=0.0)  # x_0 itself where U has no gradient there
        mean = block.x_ref - _solve(chol, g0, block)
    else:
        with torch.no_grad():  # the damped Newton steps: their derivative is not needed (below)
            mean, s_fixed = block.x_ref.expand(batch, dx).clone(), s.detach()
            chol, bad = eye.clone(), torch.zeros(batch, groups, dtype=torch.bool, device=device)
            active = torch.ones(batch, dtype=torch.bool, device=device)
            for _ in range(block.newton_steps):  # each row until its own step is negligible: no row depends on others
                rows = torch.nonzero(active).squeeze(-1)
                gradient, hessian = _gradient_and_curvature(potential_fn, s_fixed[rows], mean[rows], block,
                                                            create_graph=False)
                factor, failed = _factor(hessian, gradient, eye[rows], block)
                newton = _solve(factor, torch.nan_to_num(gradient), block)
                scale = torch.nan_to_num(torch.diagonal(hessian, dim1=-2, dim2=-1), nan=1.0).clamp_min(1e-30).rsqrt()
                newton = newton.reshape(scale.shape)  # (R, n, k)
                reach = torch.linalg.vector_norm(newton / (TRUST_RADIUS * scale), ord=8, dim=-1, keepdim=True)
                step = (newton * torch.where(reach > 1e-6, torch.tanh(reach) / reach.clamp_min(1e-6), 1.0)).flatten(1)
                step = torch.where(_per_coordinate(failed, block) | ~torch.isfinite(step), torch.zeros_like(step), step)
                mean[rows], chol[rows], bad[rows] = mean[rows] - step, factor, failed
                active[rows] = (step / scale.flatten(1)).abs().amax(-1) >= CONVERGED_STEP
                if not bool(active.any()):
                    break
        # a last, full Newton step with the curvature of each row's last reading held fixed: near the mode its
        # derivative is the implicit function theorem's, dm/ds = -H^{-1} d(grad_x U)/ds, whatever the iterates did;
        # a row whose last reading failed takes no derivative through the map (a NaN there would reach the gradient)
        s = torch.where(bad.any(-1, keepdim=True), s.detach(), s) if create_graph else s
        gradient = _gradient(potential_fn, s, mean, block, create_graph=create_graph)
        step = _solve(chol, torch.nan_to_num(gradient), block)
        mean = mean - torch.where(_per_coordinate(bad, block) | ~torch.isfinite(step), torch.zeros_like(step), step)
        chol = _factor(*_gradient_and_curvature(potential_fn, s, mean, block, create_graph=create_graph)[::-1],
                       eye, block)[0]
    log_diagonal = torch.diagonal(chol, dim1=-2, dim2=-1).log().sum((-1, -2))
    lost = ~torch.isfinite(mean).all(-1) | ~torch.isfinite(log_diagonal)
    if bool(lost.any()):  # a step that overflows (a nearly singular H): x_0 and C = I, so no s loses its mass
        chol = torch.where(lost[:, None, None, None], eye, chol)
        mean = torch.where(lost.unsqueeze(-1), block.x_ref.expand_as(mean), torch.nan_to_num(mean))
    return mean, chol


def unwhiten(potential_fn: PotentialFn, z: torch.Tensor, block: WhiteningBlock, *, create_graph: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The map :math:`(s, \varepsilon) \mapsto (s, m(s) + C(s)^{-\top}\varepsilon)` of ``z`` ``(B, D)`` and its
    log-determinant :math:`-\sum_i \log C_{ii}(s)` ``(B,)``."""
    s, eps = z[:, block.s_index], z[:, block.x_index]
    mean, chol = conditional_gaussian(potential_fn, s, block, create_graph=create_graph)
    x = mean + _solve_transposed(chol, eps, block)
    log_det = -torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum((-1, -2))
    return _assemble(block, s, x), log_det


def whiten(potential_fn: PotentialFn, z: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    r"""The inverse map: :math:`(s, x) \mapsto (s, C(s)^\top (x - m(s)))` of ``z`` ``(B, D)``."""
    s, x = z[:, block.s_index], z[:, block.x_index]
    mean, chol = conditional_gaussian(potential_fn, s, block)
    eps = _times_transposed(chol, x - mean, block)
    return _assemble(block, s, eps).detach()


def whitened_potential(potential_fn: PotentialFn, z: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    r""":math:`U'(z) = U(\text{unwhiten}(z)) - \log|\det|` ``(B,)``, differentiable in ``z`` when gradients are on."""
    create_graph = torch.is_grad_enabled() and z.requires_grad
    base, log_det = unwhiten(potential_fn, z, block, create_graph=create_graph)
    out = potential_fn(base) - log_det
    return out if create_graph else out.detach()


def is_quadratic(potential_fn: PotentialFn, points: torch.Tensor, x_index, *, generator: torch.Generator,
                 num_directions: int = 2) -> bool:
    r"""
    Whether the potential is quadratic in the coordinates ``x_index`` at each of ``points`` ``(P, D)`` (the other
    coordinates held there): along ``num_directions`` standard normal directions :math:`d` in those coordinates, the
    third difference :math:`f(2) - 3f(1) + 3f(0) - f(-1)` of :math:`f(t) = U(z + t d)` vanishes to rounding
    (:math:`10^4` machine epsilons of :math:`\sum|f|`), and every value is finite.
    """
    x_index = torch.as_tensor(list(x_index), dtype=torch.long, device=points.device)
    n, dim = points.shape
    directions = torch.zeros(num_directions, n, dim, dtype=points.dtype, device=points.device)
    noise = torch.randn(num_directions, n, x_index.numel(), dtype=torch.float64, device=generator.device,
                        generator=generator)
    directions[..., x_index] = noise.to(dtype=points.dtype, device=points.device)
    steps = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=points.dtype, device=points.device)
    rows = points + steps[:, None, None, None] * directions  # (4, directions, P, D)
    with torch.no_grad():
        f = potential_fn(rows.reshape(-1, dim)).reshape(4, -1).to(torch.float64)
    if not bool(torch.isfinite(f).all()):
        return False
    third = f[3] - 3.0 * f[2] + 3.0 * f[1] - f[0]
    tolerance = 1e4 * torch.finfo(points.dtype).eps * f.abs().sum(0)
    return bool((third.abs() <= tolerance).all())
