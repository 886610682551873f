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

__all__ = ["DiagPlusLowRank", "as_dense", "detach", "select", "slogdet", "solve", "to_dtype", "trace", "transposed",
           "well_conditioned"]

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


# every function below takes a DiagPlusLowRank or a dense (batch, D, D) tensor


def transposed(jac):
    r""":math:`J^\top` (:math:`\operatorname{diag}(d) + R^\top C^\top L^\top` for the structured form)."""
    if isinstance(jac, torch.Tensor):
        return jac.transpose(-1, -2)
    return DiagPlusLowRank(jac.diag, jac.right.transpose(-1, -2), jac.core.transpose(-1, -2),
                           jac.left.transpose(-1, -2))


def select(jac, rows):
    """The matrices of the draws ``rows`` (an index or a boolean mask) selects; shared factors stay shared."""
    if isinstance(jac, torch.Tensor):
        return jac[rows]
    diag = jac.diag[rows] if jac.diag.shape[0] > 1 else jac.diag
    left = jac.left[rows] if jac.left.dim() == 3 else jac.left
    right = jac.right[rows] if jac.right.dim() == 3 else jac.right
    return DiagPlusLowRank(diag, left, jac.core[rows], right)


def detach(jac):
    """The matrices without their autograd graph."""
    if isinstance(jac, torch.Tensor):
        return jac.detach()
    return DiagPlusLowRank(*(t.detach() for t in jac))


def to_dtype(jac, dtype: torch.dtype):
    """The matrices in ``dtype``."""
    if isinstance(jac, torch.Tensor):
        return jac.to(dtype)
    return DiagPlusLowRank(*(t.to(dtype) for t in jac))


def as_dense(jac) -> torch.Tensor:
    """The ``(batch, D, D)`` matrices themselves."""
    if isinstance(jac, torch.Tensor):
        return jac
    dense = torch.matmul(torch.matmul(jac.left, jac.core), jac.right).expand(jac.shape).clone()
    dense.diagonal(dim1=-2, dim2=-1).add_(jac.diag)
    return dense


def trace(jac) -> torch.Tensor:
    r""":math:`\operatorname{tr} J = \sum_i d_i + \operatorname{tr}(C\,R L)` per matrix, ``(batch,)``."""
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
    if isinstance(jac, torch.Tensor):
        return torch.linalg.slogdet(jac)
    m_sign, m_log_abs = torch.linalg.slogdet(_woodbury_matrix(jac))
    diag_sign = torch.sign(jac.diag).prod(-1)
    return m_sign * diag_sign, m_log_abs + jac.diag.abs().log().sum(-1)


def solve(jac, v: torch.Tensor, *, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    :math:`J^{-1} v` (or :math:`J^{-\top} v` with ``transpose``) per matrix for ``v`` of shape ``(batch, D)``:
    Woodbury for the structured form (module docstring), LU for a dense one. Returns ``(x, ok)``; rows
    whose system is singular are NaN with ``ok`` false.
    """
    if isinstance(jac, torch.Tensor):
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
