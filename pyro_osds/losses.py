# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Training objectives of the one-step diffusion sampler (pure functions of tensors and modules).

**Diffusion-sampler loss** on EM paths of the fine grid (:math:`K = T`), with the path log-weight
:math:`\log w_{\rm EM}` of :func:`pyro_osds.integrate.em_rollout`:

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
estimator, see :data:`pyro_osds.integrate.LOG_DET_METHODS`) and :math:`v` a Rademacher probe.

**Deterministic-flow reverse KL** (beyond the paper): the :math:`K`-step PF-ODE map itself, trained
on the quantity evaluation uses,

.. math::

    \mathcal L_{\rm flow} = -\frac1B\sum_b \log w_{\rm DF}^{(b)}
      = \frac1B\sum_b \Big[\log p_0(x_0^{(b)}) - \log|\det \partial F/\partial x_0| + U(x_K^{(b)})\Big]
      = \mathrm{KL}(q_K \,\|\, \pi) - \log Z,

with the exact log-determinant (through the Langevin term) and reparameterised draws.

*Folds.* Where a step's Jacobian determinant turns negative the map is not injective and
:math:`\log|\det|` understates the density of the draws, so their weights overstate
:math:`Z` and the loss above can be lowered by folding (measured: 37% folded draws and
:math:`\log Z` 0.9 nats too high on a 9-mode mixture). Folded draws are therefore left out of
the mean and replaced by ``fold_weight`` times :func:`pyro_osds.integrate.fold_penalty`, which
raises the smallest eigenvalue of the symmetric part of the folded step's Jacobian until its
orientation is restored. The barrier :math:`-\log|\det| \to \infty` at the fold's edge then
shrinks the folded region from outside while the penalty shrinks it from inside.

Paths or pairs with non-finite values are excluded from the mean and counted.

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, arXiv 2512.05251.
[2] `Single-Step Consistent Diffusion Samplers`, arXiv 2502.07579.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .divergence import rademacher
from .integrate import em_rollout, flow, ode_step
from .reference import ReferenceProcess

__all__ = ["DIFFUSION_LOSSES", "DiffusionLoss", "DistillationLoss", "FlowKLLoss", "diffusion_loss",
           "distillation_step_sizes", "flow_kl_loss", "self_distillation_loss"]

DIFFUSION_LOSSES = ("kl", "lv")
PotentialFn = Callable[[torch.Tensor], torch.Tensor]


class DiffusionLoss(NamedTuple):
    """``loss`` (scalar, ``None`` if no path was usable), detached per-path ``log_weights``, detached
    ``states`` ``(T + 1, batch, dim)`` and the number of excluded non-finite paths."""

    loss: torch.Tensor | None
    log_weights: torch.Tensor
    states: torch.Tensor
    num_invalid: int


class FlowKLLoss(NamedTuple):
    """``loss`` (scalar, ``None`` if unusable), detached per-draw DF ``log_weights``, the number of
    excluded non-finite draws and the number of folded draws (penalised instead of averaged)."""

    loss: torch.Tensor | None
    log_weights: torch.Tensor
    num_invalid: int
    num_folded: int = 0


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
    if kind not in DIFFUSION_LOSSES:
        raise ValueError(f"`kind` must be one of {DIFFUSION_LOSSES}, got {kind!r}.")
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


def flow_kl_loss(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    num_steps: int,
    *,
    fold_weight: float = 1.0,
) -> FlowKLLoss:
    """
    Reverse KL of the ``num_steps``-step deterministic flow with its exact log-det, folded draws
    replaced by ``fold_weight`` times the fold penalty (module docstring; ``fold_weight=0`` keeps
    them in the mean, unpenalised).
    """
    out = flow(net, potential_fn, process, x0, num_steps, log_det="exact", differentiable=True,
               with_fold_penalty=fold_weight > 0)
    with torch.enable_grad():
        log_w = -potential_fn(out.x) - process.prior_log_prob(x0) + out.log_det
        finite = torch.isfinite(log_w)
        num_invalid = int((~finite).sum())
        # a step folds where its determinant is negative; two such steps cancel in the orientation, but not
        # in the penalty, which is positive exactly where some step folds
        folded = out.orientation <= 0
        if out.fold_penalty is not None:
            folded = folded | (out.fold_penalty > 0)
        num_folded = int((folded & finite).sum())
        valid = finite & ~folded if fold_weight > 0 else finite
        loss = -log_w[valid].mean() if int(valid.sum()) >= 2 else None
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
    teacher_log_det = mid.log_det + end.log_det
    student_out = ode_step(student, potential_fn, process, x_start, code, d, log_det=volume, num_probes=num_probes,
                           differentiable=True, generator=generator)
    with torch.enable_grad():
        state_term = ((end.x - student_out.x) ** 2).mean(-1)
        volume_term = (teacher_log_det - student_out.log_det) ** 2
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
