# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Cholesky factorisations and solves of many small symmetric positive definite matrices (pure functions on
``(..., k, k)`` tensors), for a whitened block whose curvature splits into independent groups
(:mod:`pyro_osds.ops.conditional`): a plate of a thousand random effects is a thousand :math:`1 \times 1` (or
:math:`2 \times 2`, ...) curvatures per draw, and LAPACK's batched routines pay a call per matrix (256 draws x 1000
groups: 60 ms for a factorisation that is one square root per entry). For :math:`k \le` :data:`UNROLLED_SIZE` the
Cholesky–Banachiewicz recursion

.. math::

    L_{jj} = \Bigl(H_{jj} - \sum_{p<j} L_{jp}^2\Bigr)^{1/2},\qquad
    L_{ij} = \Bigl(H_{ij} - \sum_{p<j} L_{ip}L_{jp}\Bigr) / L_{jj}\quad (i > j)

and the triangular substitutions run entry by entry on the whole batch at once (differentiable, twice); larger
matrices go to :mod:`torch.linalg`. A pivot that is not positive (a matrix that is not positive definite) is
reported in ``info`` like :func:`torch.linalg.cholesky_ex` and replaced by one, so nothing downstream (a gradient
included) meets a NaN from it.
"""

from __future__ import annotations

import torch

__all__ = ["UNROLLED_SIZE", "cholesky_ex", "cholesky_solve", "solve_lower_transposed"]

#: the largest size factorised and solved entry by entry (above it: :mod:`torch.linalg`)
UNROLLED_SIZE = 4


def cholesky_ex(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower Cholesky factor of each ``(..., k, k)`` matrix and ``info`` ``(...,)`` (0 where it is positive
    definite, else the 1-based order of the first pivot that is not positive, as :func:`torch.linalg.cholesky_ex`;
    there the factor is finite but not a factor)."""
    size = matrix.shape[-1]
    if size > UNROLLED_SIZE:
        return torch.linalg.cholesky_ex(matrix)
    rows: list[list[torch.Tensor]] = [[] for _ in range(size)]
    info = torch.zeros(matrix.shape[:-2], dtype=torch.int32, device=matrix.device)
    for j in range(size):
        pivot = matrix[..., j, j] - sum((rows[j][p] ** 2 for p in range(j)), torch.zeros_like(matrix[..., j, j]))
        failed = ~(pivot > 0)  # NaN included
        info = torch.where(failed & (info == 0), torch.full_like(info, j + 1), info)
        diagonal = torch.sqrt(torch.where(failed, torch.ones_like(pivot), pivot))
        for i in range(j + 1, size):
            inner = sum((rows[i][p] * rows[j][p] for p in range(j)), torch.zeros_like(pivot))
            rows[i].append((matrix[..., i, j] - inner) / diagonal)
        rows[j].append(diagonal)
    zero = torch.zeros_like(matrix[..., 0, 0])
    factor = torch.stack([torch.stack(row + [zero] * (size - len(row)), -1) for row in rows], -2)
    return factor, info


def _forward(factor: torch.Tensor, vector: torch.Tensor) -> list[torch.Tensor]:
    """:math:`L^{-1} v` entry by entry (``vector`` ``(..., k)``)."""
    out: list[torch.Tensor] = []
    for i in range(factor.shape[-1]):
        inner = sum((factor[..., i, p] * out[p] for p in range(i)), torch.zeros_like(vector[..., i]))
        out.append((vector[..., i] - inner) / factor[..., i, i])
    return out


def solve_lower_transposed(factor: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    r""":math:`L^{-\top} v` for lower triangular ``factor`` ``(..., k, k)`` and ``vector`` ``(..., k)``."""
    size = factor.shape[-1]
    if size > UNROLLED_SIZE:
        return torch.linalg.solve_triangular(factor.transpose(-1, -2), vector.unsqueeze(-1), upper=True).squeeze(-1)
    out: list[torch.Tensor | None] = [None] * size
    for i in reversed(range(size)):
        inner = sum((factor[..., p, i] * out[p] for p in range(i + 1, size)), torch.zeros_like(vector[..., i]))
        out[i] = (vector[..., i] - inner) / factor[..., i, i]
    return torch.stack(out, -1)


def cholesky_solve(factor: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    r""":math:`(L L^\top)^{-1} v` for lower triangular ``factor`` ``(..., k, k)`` and ``vector`` ``(..., k)``."""
    if factor.shape[-1] > UNROLLED_SIZE:
        return torch.cholesky_solve(vector.unsqueeze(-1), factor).squeeze(-1)
    return solve_lower_transposed(factor, torch.stack(_forward(factor, vector), -1))
