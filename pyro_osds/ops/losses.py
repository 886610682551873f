# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Training objectives of the one-step diffusion sampler (pure functions of tensors and modules).

**Diffusion-sampler loss** on EM paths of the fine grid (:math:`K = T`), with the path log-weight
:math:`\log w_{\rm EM}` of :func:`pyro_osds.ops.em.em_rollout`:

* ``"kl"`` (the OSDS code): :math:`\mathcal L = -\frac1B\sum_b \log w_{\rm EM}^{(b)}` on
  reparameterised paths, i.e. the reverse KL on path space up to :math:`\log Z` (= -ELBO);
* ``"lv"``: :math:`\mathcal L = \widehat{\operatorname{Var}}_b[\log w_{\rm EM}^{(b)}]` on detached paths
  (the log-variance divergence of SCDS/DIS).

**Self-distillation** (OSDS): from states :math:`x_i` of the training paths at codes
:math:`c = T - i` with :math:`i = m d`, step sizes :math:`d = 2^k`, an EMA teacher takes two PF-ODE
half steps of size :math:`d/2` and the student one step of size :math:`d`:

.. math::

    \mathcal L_{\rm SD} = \underbrace{\tfrac1D\|x^{\rm teacher} - x^{\rm student}\|^2}_{\text{state}}
      + \lambda_{\rm vol}\,(\Lambda^{\rm teacher} - \Lambda^{\rm student})^2
      + \lambda_{\rm jac}\,\tfrac1D\|v^\top \partial_x u_\theta\|^2,

with :math:`\Lambda` the accumulated log-det of the respective steps (``volume`` selects its
estimator, see :data:`pyro_osds.ops.integrate.LOG_DET_METHODS`) and :math:`v` a Rademacher probe.

**Deterministic-flow reverse KL** (beyond the paper): the :math:`K`-step PF-ODE map itself, trained
on the quantity evaluation uses,

.. math::

    \mathcal L_{\rm flow} = -\frac1B\sum_b \log w_{\rm DF}^{(b)}
      = \frac1B\sum_b \Big[\log p_0(x_0^{(b)}) - \log|\det \partial F/\partial x_0| + U(x_K^{(b)})\Big]
      = \mathrm{KL}(q_K \,\|\, \pi) - \log Z,

with the exact log-determinant (through the Langevin term) and reparameterised draws
:math:`x_K = F_\theta(x_0)`. Its gradient has two estimators (``gradient``):

* ``"total"``: differentiate :math:`\log w_{\rm DF}` through everything, including
  :math:`\log|\det \partial F_\theta/\partial x_0|` at fixed :math:`x_0`;
* ``"path"`` (*sticking the landing*, [3]; for flows [4]): drop the score term
  :math:`\mathbb E[\partial_\theta \log q_\theta(x)|_{x\ {\rm fixed}}]`, which is zero in expectation,
  and keep only the path derivative through :math:`x_K`,

  .. math::

      \nabla_\theta \mathcal L_{\rm flow} \approx -\frac1B\sum_b \delta_b^\top
        \frac{\partial x_K^{(b)}}{\partial\theta},\qquad
      \delta = \nabla\log\pi(x_K) - \nabla\log q_\theta(x_K)
              = \Big(\frac{\partial F_\theta}{\partial x_0}\Big)^{-\top}\nabla_{x_0}\log w_{\rm DF},

  computed by one backward pass to :math:`x_0` and a solve with each step's (already computed)
  Jacobian. Both are unbiased; the path estimator's variance vanishes as :math:`q_\theta \to \pi`
  (:math:`\delta = 0`), which is what lets a one-step map get close. Near a fold
  :math:`\partial F/\partial x_0` is nearly singular and :math:`\delta` blows up; there the dropped
  term (the gradient of :math:`\log|\det|` at fixed :math:`x_0`) is what keeps the map from folding,
  so draws whose :math:`\|\delta\|` exceeds ``path_cutoff`` times the batch median of the target
  score's norm :math:`\|\nabla\log\pi(x_K)\|` keep the total gradient (rather than capping :math:`\delta`,
  or a cutoff relative to :math:`\|\delta\|` itself, which also selects draws at the optimum; the measurements:
  docs, "Design notes").

*Folds.* Where a step's Jacobian determinant turns negative the map is not injective and
:math:`\log|\det|` understates the density of the draws, so their weights overstate
:math:`Z` and the loss above can be lowered by folding. Folded draws are therefore left out of
the mean and replaced by ``fold_weight`` times :func:`pyro_osds.ops.integrate.fold_penalty`, which
raises the smallest eigenvalue of the symmetric part of the folded step's Jacobian until its
orientation is restored. The barrier :math:`-\log|\det| \to \infty` at the fold's edge then
shrinks the folded region from outside while the penalty shrinks it from inside.

Paths or pairs with non-finite values are excluded from the mean and counted.

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, P. Jutras-Dubé, J. Zhang,
    Z. Wang, R. Zhang (2025), arXiv 2512.05251.

[2] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dubé, P. Pynadath, R. Zhang (2025), arXiv 2502.07579.

[3] `Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational Inference`, G. Roeder,
    Y. Wu, D. Duvenaud (2017), NeurIPS.

[4] `Gradients should stay on path: better estimators of the reverse- and forward KL divergence for normalizing flows`,
    L. Vaitl, K. A. Nicoli, S. Nakajima, P. Kessel (2022), Machine Learning: Science and Technology 3(4).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..util import PotentialFn, check_choice
from . import lowrank
from .em import em_rollout
from .integrate import flow, ode_step
from .jacobian import rademacher
from .reference import ReferenceProcess

__all__ = ["DIFFUSION_LOSSES", "FLOW_KL_GRADIENTS", "DiffusionLoss", "DistillationLoss", "FlowKLLoss",
           "diffusion_loss", "distillation_step_sizes", "flow_kl_loss", "path_gradient_direction",
           "self_distillation_loss"]

DIFFUSION_LOSSES = ("kl", "lv")
FLOW_KL_GRADIENTS = ("path", "total")


class DiffusionLoss(NamedTuple):
    """``loss`` (scalar, ``None`` if no path was usable), detached per-path ``log_weights``, detached
    ``states`` ``(T + 1, batch, dim)`` and the number of excluded non-finite paths."""

    loss: torch.Tensor | None
    log_weights: torch.Tensor
    states: torch.Tensor
    num_invalid: int


class FlowKLLoss(NamedTuple):
    """``loss`` (scalar, ``None`` if unusable), detached per-draw DF ``log_weights``, the number of
    excluded non-finite draws (a 0-d tensor: the trainer reads it with its statistics) and the number of folded
    draws (penalised instead of averaged; a 0-d tensor when computed ``static``)."""

    loss: torch.Tensor | None
    log_weights: torch.Tensor
    num_invalid: torch.Tensor
    num_folded: int | torch.Tensor = 0


class DistillationLoss(NamedTuple):
    """``loss`` (scalar or ``None``) and its detached parts, plus the number of excluded pairs."""

    loss: torch.Tensor | None
    state: float
    volume: float
    jacobian: float
    num_invalid: int


def diffusion_loss(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    *,
    kind: str = "kl",
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> DiffusionLoss:
    """The diffusion-sampler loss (module docstring) on paths started at prior draws ``x0``."""
    check_choice("kind", kind, DIFFUSION_LOSSES)
    num_steps = process.grid_size if num_steps is None else num_steps
    log_p0 = process.prior_log_prob(x0)
    if kind == "kl":
        path = em_rollout(net, potential_fn, process, x0, num_steps, differentiable=True, generator=generator)
        with torch.enable_grad():
            potential = potential_fn(path.states[-1])
            log_w = path.log_backward - path.log_forward - potential - log_p0
    else:
        with torch.no_grad():
            sampled = em_rollout(net, potential_fn, process, x0, num_steps, generator=generator)
            potential = potential_fn(sampled.states[-1])
        path = em_rollout(net, potential_fn, process, x0, num_steps, states=sampled.states, differentiable=True)
        log_w = path.log_backward - path.log_forward - potential - log_p0
    states = path.states.detach()
    valid = torch.isfinite(log_w) & torch.isfinite(states).all(0).all(-1)
    num_invalid = int((~valid).sum())
    if int(valid.sum()) < 2:
        return DiffusionLoss(None, log_w.detach(), states, num_invalid)
    lw = log_w[valid]
    loss = -lw.mean() if kind == "kl" else lw.var()
    return DiffusionLoss(loss, log_w.detach(), states, num_invalid)


def path_gradient_direction(log_w: torch.Tensor, x0: torch.Tensor, jacobians: list,
                            rows: torch.Tensor | None = None, *, grad: torch.Tensor | None = None,
                            static: bool = False) -> torch.Tensor:
    r"""
    :math:`\delta = \nabla\log\pi(x_K) - \nabla\log q(x_K) = J^{-\top}\nabla_{x_0}\log w` per draw
    (module docstring), detached, ``(batch, dim)``.

    ``log_w`` (``(batch,)``) must be computed from ``x0`` (which requires grad) by the flow whose
    per-step Jacobians :math:`\partial x_{k+1}/\partial x_k` (each ``(batch, dim, dim)`` or a
    :class:`~pyro_osds.ops.lowrank.DiagPlusLowRank`, solved by Woodbury; first step first) are ``jacobians``; :math:`J^{-\top} = J_K^{-\top}\cdots J_1^{-\top}` applies the first
    step's inverse first. ``rows`` (a boolean mask) restricts the result to those draws; a singular
    Jacobian gives non-finite rows rather than an error. ``grad``: :math:`\nabla_{x_0}` of ``log_w[rows].sum()``,
    when the caller has it already. ``static``: every draw's row, the rows outside ``rows`` zero (those inside
    non-finite where their Jacobian is singular, as without it): the same values without selecting rows, which
    reads the device.
    """
    rows = torch.ones(log_w.shape, dtype=torch.bool, device=log_w.device) if rows is None else rows
    if grad is None:
        masked = torch.where(rows, log_w, torch.zeros_like(log_w)) if static else log_w[rows]
        (grad,) = torch.autograd.grad(masked.sum(), x0, retain_graph=True)
    if static:
        delta = grad.detach()
        for jac in jacobians:
            delta, _ = lowrank.solve(lowrank.detach(jac), delta, transpose=True)
        return torch.where(rows[:, None], delta, torch.zeros_like(delta))
    delta = grad.detach()[rows]
    for jac in jacobians:
        delta, _ = lowrank.solve(lowrank.select(lowrank.detach(jac), rows), delta, transpose=True)
    return delta


def flow_and_log_weights_fn(net: torch.nn.Module, potential_fn: PotentialFn, process: ReferenceProcess,
                            num_steps: int) -> Callable:
    """``f(z, **options) -> (out, log_w)``: the differentiable ``num_steps``-step flow of prior draws ``z`` with its
    exact log-det (:func:`~pyro_osds.ops.integrate.flow`) and the draws' log-weights."""
    def flow_and_log_weights(z, **options):
        out = flow(net, potential_fn, process, z, num_steps, log_det="exact", differentiable=True, **options)
        return out, -potential_fn(out.x) - process.prior_log_prob(z) + out.log_abs_det

    return flow_and_log_weights


def _static_flow_kl_loss(flow_and_log_weights: Callable, x0: torch.Tensor, *, fold_weight: float, path: bool,
                         path_cutoff: float | None) -> FlowKLLoss:
    """:func:`flow_kl_loss` with ``static`` (its docstring): the same values, rows masked instead of selected."""
    with torch.enable_grad():
        if path:
            x0 = x0.detach().requires_grad_(True)
        out, log_w = flow_and_log_weights(x0, with_fold_penalty=fold_weight > 0, return_jacobians=path)
        finite = torch.isfinite(log_w)
        num_invalid = (~finite).sum()
        folded = out.orientation <= 0
        if out.fold_penalty is not None:
            folded = folded | (out.fold_penalty > 0)
        num_folded = (folded & finite).sum()
        valid = finite & ~folded if fold_weight > 0 else finite
        count = valid.sum()
        zero = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
        masked_log_w = torch.where(valid, log_w, zero)
        kl = -masked_log_w.sum() / count.clamp_min(1)
        if path:
            grad_x0, grad_xk = torch.autograd.grad(masked_log_w.sum(), [x0, out.x], retain_graph=True)
            delta = path_gradient_direction(log_w, x0, out.jacobians, valid, grad=grad_x0, static=True)
            norms = delta.norm(dim=-1)
            fallback = valid & ~torch.isfinite(norms)
            if path_cutoff is not None:
                score_norms = grad_xk.detach().norm(dim=-1)
                usable = valid & torch.isfinite(score_norms)
                scale = torch.where(usable, score_norms, torch.full_like(score_norms, math.nan)).nanmedian()
                fallback = fallback | (valid & (norms > path_cutoff * scale))
            keep = (valid & ~fallback)[:, None]
            delta = torch.where(keep, delta, torch.zeros_like(delta))
            fallback_log_w = zero
            if bool(fallback.any()):  # the one read of the device here: a sub-batch of the draws that fall back
                _, sub_log_w = flow_and_log_weights(x0.detach()[fallback])
                fallback_log_w = sub_log_w.sum()
            moved = torch.where(keep, delta * out.x, torch.zeros_like(delta)).sum(-1).sum()
            surrogate = -(moved + fallback_log_w) / count.clamp_min(1)
            loss = kl.detach() + (surrogate - surrogate.detach())
        else:
            loss = kl
        enough = count >= 2
        loss = torch.where(enough, loss, zero)
        trains = enough
        if fold_weight > 0:
            penalised = folded & finite & torch.isfinite(out.fold_penalty)
            penalty = fold_weight * torch.where(penalised, out.fold_penalty, zero).sum() / log_w.numel()
            has_penalty = num_folded > 0
            loss = loss + torch.where(has_penalty, penalty, zero)
            trains = trains | has_penalty
        loss = torch.where(trains, loss, torch.full_like(loss, math.nan))
    return FlowKLLoss(loss, log_w.detach(), num_invalid, num_folded)


def flow_kl_loss(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    num_steps: int,
    *,
    fold_weight: float = 1.0,
    gradient: str = "total",
    path_cutoff: float | None = 5.0,
    path_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    static: bool = False,
) -> FlowKLLoss:
    r"""
    Reverse KL of the ``num_steps``-step deterministic flow with its exact log-det, folded draws
    replaced by ``fold_weight`` times the fold penalty (module docstring; ``fold_weight=0`` keeps
    them in the mean, unpenalised). ``gradient`` picks the estimator (``"total"`` or ``"path"``,
    module docstring; with ``"path"``, draws whose :math:`\|\delta\|` exceeds ``path_cutoff`` times
    the batch median of :math:`\|\nabla\log\pi(x_K)\|` keep the total gradient, ``None``: none
    does; ``path_scale`` maps the batch's finite score norms to that reference, default their median, and
    data-parallel training passes the median of the whole batch's). The loss's value is the reverse-KL estimate
    either way.

    ``static``: the same loss and gradient computed without selecting rows (every count and selection a masked
    reduction on the device), so that the host reads the device only where draws need the total gradient (the
    path estimator's fallback) or fold (the penalty's eigenvalues): a loss that cannot train (fewer than two usable
    draws and no fold) is NaN rather than ``None``, which the device step skips (a GPU's training, issue #23). One
    difference: a batch that trains on the fold penalty alone keeps its masked draws in the graph, so a draw whose
    log-weight overflows there (zero times an infinite derivative) makes the gradient non-finite and the step is
    skipped, where selecting trains on the penalty (with the total estimator, selecting skips such a step whenever
    the batch also has usable draws).
    """
    check_choice("gradient", gradient, FLOW_KL_GRADIENTS)
    path = gradient == "path"
    if static:
        if path_scale is not None:
            raise ValueError("`static` computes the path estimator's cutoff from this batch alone: no `path_scale`.")
        return _static_flow_kl_loss(flow_and_log_weights_fn(net, potential_fn, process, num_steps), x0,
                                    fold_weight=fold_weight, path=path, path_cutoff=path_cutoff)

    flow_and_log_weights = flow_and_log_weights_fn(net, potential_fn, process, num_steps)
    with torch.enable_grad():
        if path:
            x0 = x0.detach().requires_grad_(True)
        out, log_w = flow_and_log_weights(x0, with_fold_penalty=fold_weight > 0, return_jacobians=path)
        finite = torch.isfinite(log_w)
        num_invalid = (~finite).sum()  # read by the trainer with its statistics
        # a step folds where its determinant is negative; two such steps cancel in the orientation, but not
        # in the penalty, which is positive exactly where some step folds
        folded = out.orientation <= 0
        if out.fold_penalty is not None:
            folded = folded | (out.fold_penalty > 0)
        num_folded = int((folded & finite).sum())
        valid = finite & ~folded if fold_weight > 0 else finite
        loss = None
        if int(valid.sum()) >= 2:
            kl = -log_w[valid].mean()
            if path:
                # one backward pass gives both the path gradient's input and the target's score at the draws (for
                # the cutoff): log w depends on x_K only through -U(x_K), so its gradient there is -grad U(x_K)
                grad_x0, grad_xk = torch.autograd.grad(log_w[valid].sum(), [x0, out.x], retain_graph=True)
                delta = path_gradient_direction(log_w, x0, out.jacobians, valid, grad=grad_x0)
                # draws whose direction dwarfs the target's own score sit near a fold (or are non-finite): they
                # keep the total gradient, whose log-det term is the barrier against folding
                norms = delta.norm(dim=-1)
                fallback = ~torch.isfinite(norms)
                if path_cutoff is not None:
                    score_norms = grad_xk.detach()[valid].norm(dim=-1)
                    finite_norms = score_norms[torch.isfinite(score_norms)]
                    scale = finite_norms.median() if path_scale is None else path_scale(finite_norms)
                    fallback = fallback | (norms > path_cutoff * scale)
                delta = torch.where(fallback[:, None], torch.zeros_like(delta), delta)
                fallback_log_w = torch.zeros((), dtype=log_w.dtype, device=log_w.device)
                if bool(fallback.any()):
                    # their total gradient from a recomputed sub-batch: backpropagating the whole batch's
                    # log-det for a few draws would cost as much as the total estimator itself
                    _, sub_log_w = flow_and_log_weights(x0.detach()[valid][fallback])
                    fallback_log_w = sub_log_w.sum()
                surrogate = -((delta * out.x[valid]).sum(-1).sum() + fallback_log_w) / delta.shape[0]
                # the value of the KL estimate, the gradient of the path (and fallback) estimator
                loss = kl.detach() + (surrogate - surrogate.detach())
            else:
                loss = kl
        if fold_weight > 0 and num_folded:
            # a batch of folded draws only still trains: on the penalty alone
            penalised = folded & finite & torch.isfinite(out.fold_penalty)
            penalty = fold_weight * out.fold_penalty[penalised].sum() / log_w.numel()
            loss = penalty if loss is None else loss + penalty
    return FlowKLLoss(loss, log_w.detach(), num_invalid, num_folded)


def distillation_step_sizes(grid_size: int) -> list[int]:
    """Step sizes :math:`d = 2^k \\ge 2` (in codes) that divide the grid: the self-distillation targets."""
    sizes, d = [], 2
    while d <= grid_size and grid_size % d == 0:
        sizes.append(d)
        d *= 2
    return sizes


def self_distillation_loss(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    states: torch.Tensor,
    *,
    volume: str = "hutchinson",
    num_probes: int = 1,
    volume_weight: float = 0.25,
    jacobian_weight: float = 1e-4,
    generator: torch.Generator | None = None,
) -> DistillationLoss:
    """
    Self-distillation + volume consistency + Jacobian penalty (module docstring) on the detached
    path ``states`` of shape ``(T + 1, batch, dim)`` (index ``i`` at code ``T - i``).
    """
    T = process.grid_size
    sizes = distillation_step_sizes(T)
    if not sizes:
        raise ValueError(f"Self-distillation needs an even `grid_size`, got {T}.")
    num_states, batch, dim = states.shape
    if num_states != T + 1:
        raise ValueError(f"`states` must have T + 1 = {T + 1} entries along dim 0, got {num_states}.")
    device, dtype = states.device, states.dtype
    size_idx = torch.randint(len(sizes), (batch,), device=device, generator=generator)
    d = torch.tensor(sizes, device=device)[size_idx]
    m = (torch.rand(batch, device=device, dtype=torch.float64, generator=generator) * (T // d)).floor().long()
    start_index = m * d
    x_start = states[start_index, torch.arange(batch, device=device)]
    code = (T - start_index).to(dtype)
    d = d.to(dtype)
    with torch.no_grad():
        mid = ode_step(teacher, potential_fn, process, x_start, code, d / 2, log_det=volume, num_probes=num_probes,
                       generator=generator)
        end = ode_step(teacher, potential_fn, process, mid.x, code - d / 2, d / 2, log_det=volume,
                       num_probes=num_probes, generator=generator)
    teacher_log_det = mid.log_abs_det + end.log_abs_det
    student_out = ode_step(student, potential_fn, process, x_start, code, d, log_det=volume, num_probes=num_probes,
                           differentiable=True, generator=generator)
    with torch.enable_grad():
        state_term = ((end.x - student_out.x) ** 2).mean(-1)
        volume_term = (teacher_log_det - student_out.log_abs_det) ** 2
        per_pair = state_term + volume_weight * volume_term
        if jacobian_weight:
            v = rademacher(student_out.start.shape, dtype=dtype, device=device, generator=generator)
            (vjp,) = torch.autograd.grad(student_out.control, student_out.start, v, create_graph=True)
            jac_term = (vjp**2).mean(-1)
            per_pair = per_pair + jacobian_weight * jac_term
        else:
            jac_term = torch.zeros_like(state_term)
        valid = torch.isfinite(per_pair)
        num_invalid = int((~valid).sum())
        if not bool(valid.any()):
            return DistillationLoss(None, float("nan"), float("nan"), float("nan"), num_invalid)
        loss = per_pair[valid].mean()
    return DistillationLoss(
        loss,
        float(state_term.detach()[valid].mean()),
        float(volume_term.detach()[valid].mean()),
        float(jac_term.detach()[valid].mean()),
        num_invalid,
    )
