# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Batched matrices that are a diagonal plus a low-rank product,

.. math:: J = \operatorname{diag}(d) + L R,\qquad d \in \mathbb R^D,\ L \in \mathbb R^{D\times r},\ R \in \mathbb R^{r\times D},

and the exact linear algebra the flow needs of them in :math:`O(D r^2)` instead of :math:`O(D^3)`:

* determinant (matrix determinant lemma), with :math:`C = I_r + R\,\operatorname{diag}(d)^{-1} L`,

  .. math:: \det J = \det C \prod_i d_i ;

* solves (Woodbury),

  .. math:: J^{-1} v = D^{-1} v - D^{-1} L\, C^{-1} R\, D^{-1} v,\qquad
            J^{-\top} v = D^{-1} v - D^{-1} R^\top C^{-\top} L^\top D^{-1} v .

The one-step map's Jacobian has this form: its Langevin input is linear in :math:`x` at the prior end
(a diagonal Jacobian) and the state network's Jacobian :math:`W_L D_{L-1}\cdots D_1 W_1^{(x)}` has rank at
most its width (:meth:`~pyro_osds.ops.nets.StepConditionedControl.control_and_jacobian_factors`). Both
formulas are exact identities; they need every :math:`d_i \ne 0`, which :func:`well_conditioned` checks
(callers fall back to the dense matrix elsewhere).

**References**

[1] `Matrix Analysis`, R. A. Horn, C. R. Johnson (2012), 2nd ed., Cambridge University Press (sections 0.8.5,
    the determinant lemma, and 0.7.4, the Sherman--Morrison--Woodbury formula).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DiagPlusLowRank", "as_dense", "detach", "select", "slogdet", "solve", "trace", "transposed",
           "well_conditioned"]

#: smallest :math:`\min_i |d_i| / \max_i |d_i|` for which the diagonal is inverted
MIN_DIAGONAL_RATIO = 1e-4


class DiagPlusLowRank(NamedTuple):
    r"""
    A batch of matrices :math:`\operatorname{diag}(d) + L R`: ``diag`` ``(batch, D)``, ``left`` ``(batch, D, r)``
    (or ``(D, r)``, shared by the batch) and ``right`` ``(batch, r, D)`` (or ``(r, D)``).
    """

    diag: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        batch, dim = self.diag.shape
        return torch.Size((batch, dim, dim))

    @property
    def rank(self) -> int:
        return self.left.shape[-1]


# every function below takes a DiagPlusLowRank or a dense (batch, D, D) tensor


def transposed(jac):
    r""":math:`J^\top` (:math:`\operatorname{diag}(d) + R^\top L^\top` for the structured form)."""
    if isinstance(jac, torch.Tensor):
        return jac.transpose(-1, -2)
    return DiagPlusLowRank(jac.diag, jac.right.transpose(-1, -2), jac.left.transpose(-1, -2))


def select(jac, rows):
    """The matrices of the draws ``rows`` (an index or a boolean mask) selects; a shared factor stays shared."""
    if isinstance(jac, torch.Tensor):
        return jac[rows]
    return DiagPlusLowRank(jac.diag[rows], jac.left[rows] if jac.left.dim() == 3 else jac.left,
                           jac.right[rows] if jac.right.dim() == 3 else jac.right)


def detach(jac):
    """The matrices without their autograd graph."""
    if isinstance(jac, torch.Tensor):
        return jac.detach()
    return DiagPlusLowRank(jac.diag.detach(), jac.left.detach(), jac.right.detach())


def as_dense(jac) -> torch.Tensor:
    """The ``(batch, D, D)`` matrices themselves."""
    if isinstance(jac, torch.Tensor):
        return jac
    dense = torch.matmul(jac.left, jac.right).expand(jac.shape).clone()
    dense.diagonal(dim1=-2, dim2=-1).add_(jac.diag)
    return dense


def trace(jac) -> torch.Tensor:
    r""":math:`\operatorname{tr} J = \sum_i d_i + \sum_{ij} L_{ij} R_{ji}` per matrix, ``(batch,)``."""
    if isinstance(jac, torch.Tensor):
        return jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    low = (jac.left * jac.right.transpose(-1, -2)).sum((-1, -2))
    return jac.diag.sum(-1) + low


def well_conditioned(jac: DiagPlusLowRank) -> torch.Tensor:
    r"""Per matrix: whether the diagonal is safely invertible (:math:`\min|d_i| \ge 10^{-4}\max|d_i|`)."""
    magnitude = jac.diag.abs()
    return magnitude.min(-1).values >= MIN_DIAGONAL_RATIO * magnitude.max(-1).values


def _capacitance(jac: DiagPlusLowRank) -> torch.Tensor:
    r""":math:`C = I_r + R\,\operatorname{diag}(d)^{-1} L`, ``(batch, r, r)``."""
    scaled_left = jac.left / jac.diag.unsqueeze(-1)  # D^-1 L
    cap = torch.matmul(jac.right, scaled_left)
    return cap + torch.eye(jac.rank, dtype=cap.dtype, device=cap.device)


def slogdet(jac) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    ``(sign, log|det J|)`` per matrix, differentiable: the determinant lemma for the structured form (module
    docstring), :func:`torch.linalg.slogdet` for a dense one.
    """
    if isinstance(jac, torch.Tensor):
        return torch.linalg.slogdet(jac)
    cap_sign, cap_log_abs = torch.linalg.slogdet(_capacitance(jac))
    diag_sign = torch.sign(jac.diag).prod(-1)
    return cap_sign * diag_sign, cap_log_abs + jac.diag.abs().log().sum(-1)


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
        # J^-1 v = D^-1 v - D^-1 L C^-1 R D^-1 v
        rhs = torch.matmul(jac.right, d_inv_v.unsqueeze(-1))  # (batch, r, 1)
        y, info = torch.linalg.solve_ex(_capacitance(jac), rhs)
        x = d_inv_v - torch.matmul(jac.left, y).squeeze(-1) / jac.diag
    ok = (info == 0) & torch.isfinite(x).all(-1)
    return torch.where(ok[:, None], x, torch.full_like(x, float("nan"))), ok
