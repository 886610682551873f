# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Jacobians, divergences and scores of per-sample maps on ``(batch, dim)`` tensors.

Every function here assumes that row :math:`i` of the output depends only on row :math:`i` of the
input (the maps act independently on particles), so that the per-sample Jacobian
:math:`J_i = \partial y_i / \partial x_i` can be read off the gradient of a batch sum.

* exact Jacobian: :math:`D` reverse-mode passes, :math:`J_{i,k\cdot} = \nabla_{x_i} \sum_j y_{j,k}`;
* exact divergence: :math:`\operatorname{tr} J_i`;
* Hutchinson: :math:`\operatorname{tr} J \approx \frac1M\sum_m v_m^\top J v_m` with Rademacher
  probes, computed with vector--Jacobian products (cheaper than forward mode on CPU);
* the target score :math:`\nabla\log\rho = -\nabla U` of a batched potential, optionally with a graph
  for Hessian terms (:func:`potential_and_score`);
* the Hessian of a batched potential at a few points (:func:`potential_score_hessian`): each point is
  repeated :math:`D` times and copy :math:`k` contributes row :math:`k`, so one batched double-backward pass
  replaces :math:`D` small ones.

Log-determinants are ``torch.linalg.slogdet`` of the Jacobians.

Differentiating *through* these (``create_graph=True``) gives gradients of the log-determinant
with respect to network parameters and is what volume terms in the losses use.
"""

from __future__ import annotations

import torch

from ..util import PotentialFn

__all__ = ["batched_jacobian", "exact_trace", "hutchinson_trace", "potential_and_score", "potential_score_hessian",
           "rademacher"]


def batched_jacobian(y: torch.Tensor, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    r"""
    Per-sample Jacobians :math:`\partial y_i / \partial x_i` of shape ``(batch, out_dim, dim)``.

    ``y`` must be computed from ``x`` (which requires grad) by a map acting row by row.
    Rows of ``y`` that do not depend on ``x`` give zero Jacobian rows.
    """
    rows = []
    for k in range(y.shape[-1]):
        (row,) = torch.autograd.grad(
            y[:, k].sum(), x, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        rows.append(torch.zeros_like(x) if row is None else row)
    return torch.stack(rows, dim=-2)


def exact_trace(y: torch.Tensor, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    r"""Exact divergence :math:`\operatorname{tr}(\partial y_i / \partial x_i)`, shape ``(batch,)``."""
    total = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
    for k in range(y.shape[-1]):
        (row,) = torch.autograd.grad(
            y[:, k].sum(), x, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        if row is not None:
            total = total + row[:, k]
    return total


def rademacher(shape, *, dtype=None, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rademacher (±1) probes."""
    bits = torch.randint(0, 2, shape, device=device, generator=generator)
    return (2 * bits - 1).to(dtype or torch.get_default_dtype())


def hutchinson_trace(
    y: torch.Tensor, x: torch.Tensor, probes: torch.Tensor, *, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Hutchinson estimate of :math:`\operatorname{tr}(\partial y_i / \partial x_i)` from probes of
    shape ``(num_probes, batch, dim)``.

    :returns: ``(trace_estimate, vjp)`` with ``trace_estimate`` of shape ``(batch,)`` and the
        vector--Jacobian products :math:`v^\top J` of shape ``(num_probes, batch, dim)`` (reused by
        the Jacobian penalty, :math:`\mathbb E\|v^\top J\|^2 = \|J\|_F^2`).
    """
    vjps = []
    for v in probes:
        (vjp,) = torch.autograd.grad(y, x, v, retain_graph=True, create_graph=create_graph, allow_unused=True)
        vjps.append(torch.zeros_like(x) if vjp is None else vjp)
    vjp = torch.stack(vjps)
    return (vjp * probes).sum(-1).mean(0), vjp


def potential_and_score(
    potential_fn: PotentialFn, x: torch.Tensor, *, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Batched potential :math:`U(x) = -\log\rho(x)` and target score :math:`\nabla\log\rho(x)`.

    ``x`` must require grad when ``create_graph`` is true (the score then carries a graph to
    ``x``, e.g. for Hessian terms); otherwise a detached copy is differentiated.
    """
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        potential = potential_fn(x)
        (grad,) = torch.autograd.grad(potential.sum(), x, create_graph=create_graph)
    if not create_graph:
        potential, grad = potential.detach(), grad.detach()
    return potential, -grad


def potential_score_hessian(
    potential_fn: PotentialFn, x: torch.Tensor, *, max_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    :math:`U(x)`, the score :math:`\nabla\log\rho(x)` and the Hessian :math:`\nabla^2 U(x)` at every row of ``x``
    (``(batch, dim)``; detached results of shapes ``(batch,)``, ``(batch, dim)``, ``(batch, dim, dim)``).

    The potential acts row by row, so with :math:`D` copies :math:`z_1 = \dots = z_D = x` of a point,
    :math:`\nabla_{z_k} \sum_j \partial_j U(z_j) = \nabla\,\partial_k U(x)` is row :math:`k` of its Hessian: one
    double-backward pass over the copies (at most ``max_rows`` rows per pass, whole points at a time) does
    the work of :math:`D` passes over the points, as large matrix products.
    """
    batch, dim = x.shape
    per_pass = max(1, max_rows // dim)
    us, scores, hessians = [], [], []
    eye = torch.eye(dim, dtype=torch.bool, device=x.device)
    for start in range(0, batch, per_pass):
        points = x[start : start + per_pass].detach()
        n = points.shape[0]
        with torch.enable_grad():
            z = points.repeat_interleave(dim, 0).requires_grad_(True)  # copy k of point b at row b * dim + k
            u = potential_fn(z)
            (grad,) = torch.autograd.grad(u.sum(), z, create_graph=True)
            diagonal = grad.reshape(n, dim, dim)[:, eye]  # d_k U at copy k
            (rows,) = torch.autograd.grad(diagonal.sum(), z)
        us.append(u.detach().reshape(n, dim)[:, 0])
        scores.append(-grad.detach().reshape(n, dim, dim)[:, 0])
        hessians.append(rows.reshape(n, dim, dim))
    return torch.cat(us), torch.cat(scores), torch.cat(hessians)
