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

__all__ = ["WhiteningBlock", "colour_columns", "conditional_gaussian", "is_quadratic", "unwhiten", "whiten", "whitened_potential"]

PotentialFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class WhiteningBlock:
    """The split :math:`z = (s, x)`: ``x_index`` the whitened coordinates, ``s_index`` the rest (both ``long``
    tensors on the target's device), ``x_ref`` :math:`x_0`, the point the gradients are taken at ``(d_x,)``, and
    the curvature's sparsity: ``pattern`` ``(d_x, d_x)`` (``True`` where :math:`H_{ij}` may be non-zero) and a
    ``colour`` per column (:func:`colour_columns`): one gradient difference per colour gives every column of it."""

    s_index: torch.Tensor
    x_index: torch.Tensor
    x_ref: torch.Tensor
    pattern: torch.Tensor
    colour: torch.Tensor

    @classmethod
    def of(cls, dim: int, x_index, x_ref: torch.Tensor, pattern: torch.Tensor | None = None) -> WhiteningBlock:
        """The block of ``x_index`` in ``dim`` coordinates; ``pattern`` ``None``: a dense curvature."""
        device = x_ref.device
        x_index = torch.as_tensor(list(x_index), dtype=torch.long, device=device)
        keep = torch.ones(dim, dtype=torch.bool, device=device)
        keep[x_index] = False
        dx = x_index.numel()
        if pattern is None:
            pattern = torch.ones(dx, dx, dtype=torch.bool, device=device)
        pattern = pattern.to(device) | pattern.to(device).T | torch.eye(dx, dtype=torch.bool, device=device)
        return cls(torch.nonzero(keep).squeeze(-1), x_index, x_ref.detach(), pattern, colour_columns(pattern))

    @property
    def num_colours(self) -> int:
        """The gradient differences one reading of :math:`H` takes (one per colour)."""
        return int(self.colour.max()) + 1 if self.colour.numel() else 0


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


def _assemble(block: WhiteningBlock, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The flat ``(..., D)`` vector with ``s`` and ``x`` at their coordinates."""
    dim = block.s_index.numel() + block.x_index.numel()
    z = s.new_zeros(s.shape[:-1] + (dim,))
    z = z.index_copy(-1, block.s_index, s) if block.s_index.numel() else z
    return z.index_copy(-1, block.x_index, x)


def conditional_gaussian(potential_fn: PotentialFn, s: torch.Tensor, block: WhiteningBlock, *,
                         create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    :math:`m(s)` ``(B, d_x)`` and the lower Cholesky factor :math:`C(s)` of :math:`H(s)` ``(B, d_x, d_x)`` for a batch
    of ``s`` ``(B, d_s)`` (module docstring), differentiable in ``s`` when ``create_graph``.
    """
    batch, dx, colours = s.shape[0], block.x_index.numel(), block.num_colours
    dtype, device = block.x_ref.dtype, block.x_ref.device
    seeds = (block.colour == torch.arange(colours, device=device).unsqueeze(-1)).to(dtype)  # (colours, d_x)
    offsets = torch.cat([torch.zeros(1, dx, dtype=dtype, device=device), seeds])
    with torch.enable_grad():
        points = (block.x_ref + offsets).expand(batch, colours + 1, dx).detach().requires_grad_(True)
        rows = _assemble(block, s.unsqueeze(1).expand(batch, colours + 1, s.shape[-1]), points)
        (grads,) = torch.autograd.grad(potential_fn(rows.reshape(batch * (colours + 1), -1)).sum(), points,
                                       create_graph=create_graph)
    grads = grads.reshape(batch, colours + 1, dx)
    g0 = grads[:, 0]
    differences = grads[:, 1:] - g0.unsqueeze(1)  # (B, colours, d_x): H times each colour's seed
    hessian = differences[:, block.colour].transpose(-1, -2) * block.pattern  # H_ij from column j's colour, row i
    hessian = 0.5 * (hessian + hessian.transpose(-1, -2))
    chol, info = torch.linalg.cholesky_ex(hessian)
    eye = torch.eye(dx, dtype=dtype, device=device).expand(batch, dx, dx)
    bad = (info != 0) | ~torch.isfinite(chol).flatten(1).all(-1)
    if bool(bad.any()):  # not positive definite there: one gradient step and C = I, still an invertible map
        chol = torch.where(bad[:, None, None], eye, torch.nan_to_num(chol))
        g0 = torch.nan_to_num(g0, nan=0.0, posinf=0.0, neginf=0.0)  # x_0 itself where U has no gradient there
    mean = block.x_ref - torch.cholesky_solve(g0.unsqueeze(-1), chol).squeeze(-1)
    lost = ~torch.isfinite(mean).all(-1) | ~torch.isfinite(torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1))
    if bool(lost.any()):  # a step that overflows (a nearly singular H): x_0 and C = I, so no s loses its mass
        chol = torch.where(lost[:, None, None], eye, chol)
        mean = torch.where(lost.unsqueeze(-1), block.x_ref.expand_as(mean), torch.nan_to_num(mean))
    return mean, chol


def unwhiten(potential_fn: PotentialFn, z: torch.Tensor, block: WhiteningBlock, *, create_graph: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The map :math:`(s, \varepsilon) \mapsto (s, m(s) + C(s)^{-\top}\varepsilon)` of ``z`` ``(B, D)`` and its
    log-determinant :math:`-\sum_i \log C_{ii}(s)` ``(B,)``."""
    s, eps = z[:, block.s_index], z[:, block.x_index]
    mean, chol = conditional_gaussian(potential_fn, s, block, create_graph=create_graph)
    x = mean + torch.linalg.solve_triangular(chol.transpose(-1, -2), eps.unsqueeze(-1), upper=True).squeeze(-1)
    log_det = -torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return _assemble(block, s, x), log_det


def whiten(potential_fn: PotentialFn, z: torch.Tensor, block: WhiteningBlock) -> torch.Tensor:
    r"""The inverse map: :math:`(s, x) \mapsto (s, C(s)^\top (x - m(s)))` of ``z`` ``(B, D)``."""
    s, x = z[:, block.s_index], z[:, block.x_index]
    mean, chol = conditional_gaussian(potential_fn, s, block)
    eps = (chol.transpose(-1, -2) @ (x - mean).unsqueeze(-1)).squeeze(-1)
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
