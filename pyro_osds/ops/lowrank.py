# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Batched matrices that are a diagonal plus a low-rank product with a small per-draw core,

.. math:: J = \operatorname{diag}(d) + L\,C\,R,\qquad d \in \mathbb R^D,\ L \in \mathbb R^{D\times r},\
          C \in \mathbb R^{r\times r},\ R \in \mathbb R^{r\times D},

and the exact linear algebra the flow needs of them. With the inner product :math:`K = R\,\operatorname{diag}(d)^{-1} L`
(:math:`r \times r`) and :math:`M = I_r + K C`:

* determinant (matrix determinant lemma): :math:`\det J = \det M \prod_i d_i`;
* solves (Woodbury):

  .. math:: J^{-1} v = D^{-1} v - D^{-1} L C\, M^{-1} R\, D^{-1} v ,

  and :math:`J^\top` has the same form with :math:`(R^\top, C^\top, L^\top)`.

Any factor may be shared by the whole batch (no batch dimension). The one-step map's Jacobian has this
form with :math:`d`, :math:`L` and :math:`R` shared and only the core per draw
(:meth:`~pyro_osds.ops.nets.StepConditionedControl.control_and_jacobian_factors`): then :math:`K` is one
:math:`r\times r` matrix and a draw costs :math:`O(r^3 + D r)` for its determinant and solves, where the dense
matrix costs :math:`O(D^3)`. Both formulas are exact identities; they need every :math:`d_i \ne 0`, which
:func:`well_conditioned` checks (callers form the dense matrix otherwise).

**References**

[1] `Matrix Analysis`, R. A. Horn, C. R. Johnson (2012), 2nd ed., Cambridge University Press (sections 0.8.5,
    the determinant lemma, and 0.7.4, the Sherman--Morrison--Woodbury formula).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DiagPlusLowRank", "FactoredDense", "as_dense", "detach", "select", "slogdet", "slogdet_with_factors",
           "solve", "to_dtype", "trace", "transposed", "well_conditioned"]

#: smallest :math:`\min_i |d_i| / \max_i |d_i|` for which the diagonal is inverted
MIN_DIAGONAL_RATIO = 1e-4


class DiagPlusLowRank(NamedTuple):
    r"""
    A batch of ``batch`` matrices :math:`\operatorname{diag}(d) + L C R` (module docstring): ``diag``
    ``(batch, D)`` or ``(1, D)``, ``left`` ``(batch, D, r)`` or ``(D, r)``, ``core`` ``(batch, r, r)`` and
    ``right`` ``(batch, r, D)`` or ``(r, D)``; the factors without a batch dimension are shared.
    """

    diag: torch.Tensor
    left: torch.Tensor
    core: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.core.shape[0], self.diag.shape[-1], self.diag.shape[-1]))

    @property
    def rank(self) -> int:
        return self.core.shape[-1]


class FactoredDense(NamedTuple):
    r"""
    A batch of dense matrices ``matrix`` ``(batch, D, D)`` with the LU factors (``lu``, ``pivots``, as
    :func:`torch.linalg.lu_factor`) of ``matrix``, or of its transpose when ``of_transpose``: the factorisation
    :func:`slogdet_with_factors` made for the determinant, kept so that a solve with the same matrices needs no
    second one (training's path gradient solves with every step's Jacobian).
    """

    matrix: torch.Tensor
    lu: torch.Tensor
    pivots: torch.Tensor
    of_transpose: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.matrix.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype


class _SlogdetLU(torch.autograd.Function):
    r""":math:`\log|\det A|` from the LU factors of :math:`A`, which come out too; its gradient is
    :math:`A^{-\top}` from the same factors (as :func:`torch.linalg.slogdet`'s). First derivatives only."""

    @staticmethod
    def forward(a):
        lu, pivots, _ = torch.linalg.lu_factor_ex(a)
        diagonal = lu.diagonal(dim1=-2, dim2=-1)
        swaps = (pivots != torch.arange(1, a.shape[-1] + 1, dtype=pivots.dtype, device=pivots.device)).sum(-1)
        sign = torch.sign(diagonal).prod(-1) * (1 - 2 * (swaps % 2)).to(a.dtype)
        return sign, diagonal.abs().log().sum(-1), lu, pivots

    @staticmethod
    def setup_context(ctx, inputs, output):
        sign, _, lu, pivots = output
        ctx.mark_non_differentiable(sign, lu, pivots)
        ctx.save_for_backward(lu, pivots)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_sign, grad_log_abs, grad_lu, grad_pivots):
        lu, pivots = ctx.saved_tensors
        eye = torch.eye(lu.shape[-1], dtype=lu.dtype, device=lu.device).expand_as(lu)
        return grad_log_abs[..., None, None] * torch.linalg.lu_solve(lu, pivots, eye, adjoint=True)


def slogdet_with_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, FactoredDense]:
    r"""
    ``(sign, log|det A|, FactoredDense(A, ...))`` for dense matrices ``A`` ``(batch, D, D)``: the values of
    :func:`torch.linalg.slogdet`, differentiable once (the gradient :math:`A^{-\top}` from the same LU
    factors; a second derivative raises), and the factors for :func:`solve`.
    """
    sign, log_abs, lu, pivots = _SlogdetLU.apply(matrix)
    return sign, log_abs, FactoredDense(matrix, lu, pivots, False)


# every function below takes a DiagPlusLowRank, a FactoredDense or a dense (batch, D, D) tensor


def transposed(jac):
    r""":math:`J^\top` (:math:`\operatorname{diag}(d) + R^\top C^\top L^\top` for the structured form)."""
    if isinstance(jac, torch.Tensor):
        return jac.transpose(-1, -2)
    if isinstance(jac, FactoredDense):
        return FactoredDense(jac.matrix.transpose(-1, -2), jac.lu, jac.pivots, not jac.of_transpose)
    return DiagPlusLowRank(jac.diag, jac.right.transpose(-1, -2), jac.core.transpose(-1, -2),
                           jac.left.transpose(-1, -2))


def select(jac, rows):
    """The matrices of the draws ``rows`` (an index or a boolean mask) selects; shared factors stay shared."""
    if isinstance(jac, torch.Tensor):
        return jac[rows]
    if isinstance(jac, FactoredDense):
        return FactoredDense(jac.matrix[rows], jac.lu[rows], jac.pivots[rows], jac.of_transpose)
    diag = jac.diag[rows] if jac.diag.shape[0] > 1 else jac.diag
    left = jac.left[rows] if jac.left.dim() == 3 else jac.left
    right = jac.right[rows] if jac.right.dim() == 3 else jac.right
    return DiagPlusLowRank(diag, left, jac.core[rows], right)


def detach(jac):
    """The matrices without their autograd graph."""
    if isinstance(jac, torch.Tensor):
        return jac.detach()
    if isinstance(jac, FactoredDense):
        return FactoredDense(jac.matrix.detach(), jac.lu.detach(), jac.pivots, jac.of_transpose)
    return DiagPlusLowRank(*(t.detach() for t in jac))


def to_dtype(jac, dtype: torch.dtype):
    """The matrices in ``dtype`` (a :class:`FactoredDense` becomes its dense matrices: factors are per dtype)."""
    if isinstance(jac, FactoredDense):
        jac = jac.matrix
    if isinstance(jac, torch.Tensor):
        return jac.to(dtype)
    return DiagPlusLowRank(*(t.to(dtype) for t in jac))


def as_dense(jac) -> torch.Tensor:
    """The ``(batch, D, D)`` matrices themselves."""
    if isinstance(jac, FactoredDense):
        return jac.matrix
    if isinstance(jac, torch.Tensor):
        return jac
    dense = torch.matmul(torch.matmul(jac.left, jac.core), jac.right).expand(jac.shape).clone()
    dense.diagonal(dim1=-2, dim2=-1).add_(jac.diag)
    return dense


def trace(jac) -> torch.Tensor:
    r""":math:`\operatorname{tr} J = \sum_i d_i + \operatorname{tr}(C\,R L)` per matrix, ``(batch,)``."""
    jac = jac.matrix if isinstance(jac, FactoredDense) else jac
    if isinstance(jac, torch.Tensor):
        return jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    right_left = torch.matmul(jac.right, jac.left)  # (r, r), per draw only if a factor is
    return jac.diag.sum(-1) + (jac.core * right_left.transpose(-1, -2)).sum((-1, -2))


def well_conditioned(jac: DiagPlusLowRank) -> torch.Tensor:
    r"""Per matrix row of ``diag``: whether it is safely invertible (:math:`\min|d_i| \ge 10^{-4}\max|d_i|`)."""
    magnitude = jac.diag.abs()
    return magnitude.min(-1).values >= MIN_DIAGONAL_RATIO * magnitude.max(-1).values


def _woodbury_matrix(jac: DiagPlusLowRank) -> torch.Tensor:
    """:math:`M = I_r + K C` with :math:`K = R\\,\\operatorname{diag}(d)^{-1} L` (one product when all three are
    shared), ``(batch, r, r)``."""
    inner = torch.matmul(jac.right / jac.diag.unsqueeze(-2), jac.left)
    return torch.matmul(inner, jac.core) + torch.eye(jac.rank, dtype=jac.core.dtype, device=jac.core.device)


def slogdet(jac) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    ``(sign, log|det J|)`` per matrix, differentiable: the determinant lemma for the structured form (module
    docstring), :func:`torch.linalg.slogdet` for a dense one.
    """
    jac = jac.matrix if isinstance(jac, FactoredDense) else jac
    if isinstance(jac, torch.Tensor):
        return torch.linalg.slogdet(jac)
    m_sign, m_log_abs = torch.linalg.slogdet(_woodbury_matrix(jac))
    diag_sign = torch.sign(jac.diag).prod(-1)
    return m_sign * diag_sign, m_log_abs + jac.diag.abs().log().sum(-1)


def solve(jac, v: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    :math:`J^{-1} v` (or :math:`J^{-\top} v` with ``transpose``) per matrix for ``v`` of shape ``(batch, D)``:
    Woodbury for the structured form (module docstring), LU for a dense one (the factors it carries for a
    :class:`FactoredDense`). Returns ``(x, ok)``; rows whose system is singular are NaN with ``ok`` false.
    """
    if isinstance(jac, FactoredDense):
        # the factors are of the system's matrix itself, or of its transpose (then solved as the adjoint)
        x = torch.linalg.lu_solve(jac.lu, jac.pivots, v.unsqueeze(-1), adjoint=transpose != jac.of_transpose)
        x = x.squeeze(-1)
        info = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    elif isinstance(jac, torch.Tensor):
        a = jac.transpose(-1, -2) if transpose else jac
        x, info = torch.linalg.solve_ex(a, v.unsqueeze(-1))
        x = x.squeeze(-1)
    else:
        if transpose:
            jac = transposed(jac)
        d_inv_v = v / jac.diag
        rhs = torch.matmul(jac.right, d_inv_v.unsqueeze(-1))  # R D^-1 v, (batch, r, 1)
        y, info = torch.linalg.solve_ex(_woodbury_matrix(jac).expand(v.shape[0], -1, -1), rhs)
        x = d_inv_v - torch.matmul(jac.left, torch.matmul(jac.core, y)).squeeze(-1) / jac.diag
    ok = (info == 0) & torch.isfinite(x).all(-1)
    return torch.where(ok[:, None], x, torch.full_like(x, float("nan"))), ok
