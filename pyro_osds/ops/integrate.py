# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The deterministic probability-flow (PF) ODE of the controlled diffusion sampler with its volume tracker (its exact
inverse: :mod:`~pyro_osds.ops.inverse`; the stochastic Euler--Maruyama rollout: :mod:`~pyro_osds.ops.em`).

Notation (codes :math:`c`, step :math:`d` codes, :math:`\Delta = d / T`, coefficients frozen at the
step's starting code :math:`c`, generation from :math:`c = T` down to :math:`0`):

* Langevin input: :math:`g(x, c) = \sigma(c)\,\nabla_x\big[(1 - \tfrac cT)\log\rho(x) + \tfrac cT \log p_0(x)\big]`;
* PF-ODE (Euler) step:
  :math:`x' = F_c(x) = x + \Delta\big(\tfrac12\sigma(c)\,u_\theta(x, \tfrac cT, \Delta, g(x, c)) + \tfrac12\beta(c)\,x\big)`;

The volume tracker accumulates a log-determinant per step. ``log_det`` selects how:

``"exact"`` (default, honest)
    :math:`\log|\det \partial F_c / \partial x|` of the discrete step, differentiating through the
    Langevin input :math:`g(x)` (so through the Hessian of :math:`\log\rho`). The resulting
    importance weights are exact for the map actually applied.
``"exact_frozen_langevin"``
    exact discrete log-det but with :math:`g` held constant (ablation).
``"euler_trace"``
    :math:`\Delta\,(\tfrac12\beta D + \tfrac12\sigma\operatorname{tr}\partial u/\partial x)`, :math:`g`
    constant: the continuous change of variables discretised with Euler (not a bound at few steps).
``"hutchinson"``
    the same with a Rademacher Hutchinson estimate of the trace: the OSDS code's weight.
``"none"``
    no volume tracking.

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, P. Jutras-Dubé, J. Zhang,
    Z. Wang, R. Zhang (2025), arXiv 2512.05251.

[2] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dubé, P. Pynadath, R. Zhang (2025), arXiv 2502.07579.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..util import PotentialFn, check_choice, tensor_on_its_device
from . import lowrank
from .jacobian import batched_jacobian, exact_trace, hutchinson_trace, potential_and_score, rademacher
from .reference import ReferenceProcess

__all__ = [
    "EXACT_LOG_DET_METHODS",
    "LOG_DET_METHODS",
    "FlowOutput",
    "StepOutput",
    "control_and_jacobian",
    "count_folded",
    "flow",
    "fold_penalty",
    "langevin_input",
    "ode_step",
    "prefers_low_rank",
    "step_jacobian",
    "target_weight",
]

LOG_DET_METHODS = ("exact", "exact_frozen_langevin", "euler_trace", "hutchinson", "none")
#: the log-det methods that are exact for the discrete map (and give orientations and Jacobians)
EXACT_LOG_DET_METHODS = ("exact", "exact_frozen_langevin")


class StepOutput(NamedTuple):
    r"""One PF-ODE step: new state, log-det increment, its sign (exact modes), control, start, and
    the step's Jacobian :math:`\partial x_{\rm next}/\partial x` (``(batch, dim, dim)``, rows are
    outputs, or its :class:`~pyro_osds.ops.lowrank.DiagPlusLowRank` form, or, differentiable and dense, a
    :class:`~pyro_osds.ops.lowrank.FactoredDense` with the determinant's LU factors; exact modes, only if asked
    for)."""

    x: torch.Tensor
    log_abs_det: torch.Tensor
    sign: torch.Tensor | None
    control: torch.Tensor
    start: torch.Tensor
    jacobian: torch.Tensor | None = None


class FlowOutput(NamedTuple):
    r"""
    Result of :func:`flow`: final states ``x``, accumulated ``log_abs_det`` (``(batch,)``),
    ``orientation`` (``(batch,)``: sign of the whole map's Jacobian determinant, the product of the
    steps' signs; ``None`` unless an exact log-det method was used), the ``trajectory`` (list of
    states, if asked for), the ``fold_penalty`` (if asked for, ``(batch,)``; see :func:`fold_penalty`)
    and the per-step ``jacobians`` (if asked for: :math:`\partial x_{k+1}/\partial x_k`, each
    ``(batch, dim, dim)``, first step first).

    An injective smooth map has one orientation on a connected domain, so draws whose orientation
    differs from the others' reveal a *fold* (the map is not injective there and the
    change-of-variables weight is not exact); see :func:`count_folded`.
    """

    x: torch.Tensor
    log_abs_det: torch.Tensor
    orientation: torch.Tensor | None
    trajectory: list | None
    fold_penalty: torch.Tensor | None = None
    jacobians: list | None = None


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-1) if v.dim() == 1 else v


def langevin_input(
    process: ReferenceProcess, x: torch.Tensor, code, target_score: torch.Tensor, step=0.0
) -> torch.Tensor:
    r"""
    :math:`g(x, c) = \sigma(c)\big[(1 - \tau)\nabla\log\rho(x) + \tau\nabla\log p_0(x)\big]` with
    :math:`\tau = c/T` (``process.langevin_time == "start"``) or :math:`(c - d)/T` (``"end"``) for a
    step of ``step`` codes; :math:`\sigma` is always taken at the step's start.
    """
    sigma = process.sigma(code)
    tau = 1.0 - target_weight(process, code, step)
    if isinstance(sigma, torch.Tensor):
        sigma = _col(sigma)
    if isinstance(tau, torch.Tensor):
        tau = _col(tau)
    return sigma * ((1.0 - tau) * target_score + tau * process.prior_score(x))


def target_weight(process: ReferenceProcess, code, step) -> torch.Tensor | float:
    r"""The target's interpolation weight :math:`1 - \tau` of the Langevin input for a step from ``code``."""
    tau_code = code - step if process.langevin_time == "end" else code
    return 1.0 - tau_code / process.grid_size


def _as_code(code, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(code, dtype=x.dtype, device=x.device)


def _step_graph(net, potential_fn, process, x_in, code, step, *, through_g):
    """Builds one PF-ODE step on ``x_in`` (requires grad) under autograd; returns ``(u, x_next)``."""
    T = process.grid_size
    dt = _col(step / T)
    beta = _col(process.beta(code))
    sigma = _col(process.sigma(code))
    if not bool((tensor_on_its_device(target_weight(process, code, step)) != 0).any()):
        # the target's interpolation weight is zero (a step from the prior end, c = T): skip its score
        score = torch.zeros_like(x_in)
    else:
        _, score = potential_and_score(potential_fn, x_in, create_graph=through_g)
    g = langevin_input(process, x_in, code, score, step)
    if not through_g:
        g = g.detach()
    u = net(x_in, code / T, step / T, g)
    return u, x_in + dt * (0.5 * sigma * u + 0.5 * beta * x_in)


def step_jacobian(
    net: torch.nn.Module, potential_fn: PotentialFn, process: ReferenceProcess, x: torch.Tensor, code, step
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached ``(F_c(x), dF_c/dx)`` of one PF-ODE step, differentiating through the Langevin input."""
    code, step = _as_code(code, x), _as_code(step, x)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        _, x_next = _step_graph(net, potential_fn, process, x_in, code, step, through_g=True)
        jac = batched_jacobian(x_next, x_in)
    return x_next.detach(), jac.detach()


def prefers_low_rank(net, dim: int) -> bool:
    """Whether ``net``'s Jacobian is cheaper as a diagonal plus its low-rank part (:mod:`~pyro_osds.ops.lowrank`)
    than as a dense ``dim x dim`` matrix: when it has one and ``dim`` exceeds its rank."""
    rank = getattr(net, "jacobian_rank", None)
    return rank is not None and dim > rank


def control_and_jacobian(net, potential_fn: PotentialFn, process: ReferenceProcess, x_in: torch.Tensor, code, step,
                         *, through_g: bool, differentiable: bool, low_rank: bool = False,
                         needs_score: bool | None = None):
    r"""
    The control :math:`u = u_\theta(x, \tfrac cT, \tfrac dT, g(x, c))` of a step of ``step`` codes
    from ``code`` and its exact transposed Jacobian, from the network's closed form
    (:meth:`~pyro_osds.ops.nets.ControlNetwork.control_and_jacobian`):

    .. math::

        \frac{\partial u}{\partial x} = \frac{\partial h}{\partial x}
          + \operatorname{diag}(b)\frac{\partial g}{\partial x},\qquad
        \frac{\partial g}{\partial x} = \sigma(c)\Big[(1 - \tau)\nabla^2\log\rho - \frac{\tau}{\sigma_0^2} I\Big],

    so automatic differentiation is only needed for the Hessian of :math:`\log\rho`, and not at all
    when the target's weight :math:`1 - \tau` is zero (every one-step map with ``langevin_time="start"``).
    With ``through_g=False`` the Langevin input is held constant (:math:`\partial g/\partial x = 0`).
    ``x_in`` must require grad. Every step map of the package (PF-ODE steps, the consistency function)
    is :math:`a\,x + b\,u` for per-sample scalars :math:`a, b`, so its Jacobian follows from this one.
    With ``low_rank`` and a diagonal :math:`\partial g/\partial x` (no Hessian term) the Jacobian comes as
    a :class:`~pyro_osds.ops.lowrank.DiagPlusLowRank` from
    :meth:`~pyro_osds.ops.nets.ControlNetwork.control_and_jacobian_factors`, in :math:`O(D r^2)`.
    ``needs_score``: whether the target's weight is non-zero for some draw, when the caller knows it from the codes
    as numbers (else it is read from the device). Returns ``(u, (du/dx)^T)``.
    """
    T = process.grid_size
    batch, dim = x_in.shape

    def per_sample(v):  # number, 0-d or (batch,) -> (batch,)
        return torch.as_tensor(v, dtype=x_in.dtype, device=x_in.device).expand(batch)

    weight = target_weight(process, code, step)
    tau = 1.0 - per_sample(weight)
    sigma = per_sample(process.sigma(code))
    hessian = None
    if needs_score is None:
        needs_score = bool((weight != 0).any()) if isinstance(weight, torch.Tensor) else weight != 0
    if needs_score:
        _, score = potential_and_score(potential_fn, x_in, create_graph=through_g)
        if through_g:
            hessian = batched_jacobian(score, x_in, create_graph=differentiable)
        else:
            score = score.detach()
    else:
        score = torch.zeros_like(x_in)
    g = langevin_input(process, x_in, code, score, step)
    # dg/dx = sigma [(1 - tau) Hessian(log rho) - tau / sigma0^2 I]; zero when g is held constant
    prior_diag = -(sigma * tau / process.prior_scale**2).unsqueeze(-1).expand(batch, dim)
    if not through_g:
        g = g.detach()
        g_jac = torch.zeros_like(x_in)
    elif hessian is None:
        g_jac = prior_diag
    else:
        g_jac = (sigma * (1.0 - tau))[:, None, None] * hessian + torch.diag_embed(prior_diag)
    if low_rank and g_jac.dim() == 2:
        if tensor_on_its_device(code).dim() == 0 and tensor_on_its_device(step).dim() == 0:
            g_jac = g_jac[:1]  # the same for every draw: the factors keep it shared
        u, u_jac = net.control_and_jacobian_factors(x_in, code / T, step / T, g, g_jac)
        return u, lowrank.transposed(u_jac)
    return net.control_and_jacobian(x_in, code / T, step / T, g, g_jac, transposed=True)


def _structured_step(net, potential_fn, process, x_in, code, step, *, through_g, differentiable, needs_score=None):
    r"""
    One PF-ODE step with its exact Jacobian from :func:`control_and_jacobian`:

    .. math::

        \frac{\partial F_c}{\partial x} = (1 + \tfrac12\Delta\beta) I + \tfrac12\Delta\sigma\,
        \frac{\partial u}{\partial x}.

    Returns ``(u, x_next, jacobian^T)`` (the transpose: what the determinant and trace need), dense or, where
    :func:`prefers_low_rank` and the step has no Hessian term, a well-conditioned
    :class:`~pyro_osds.ops.lowrank.DiagPlusLowRank`.
    """
    T = process.grid_size
    batch = x_in.shape[0]

    def per_sample(v):  # number, 0-d or (batch,) -> (batch,)
        return torch.as_tensor(v, dtype=x_in.dtype, device=x_in.device).expand(batch)

    sigma, beta, dt = per_sample(process.sigma(code)), per_sample(process.beta(code)), per_sample(step / T)
    u, u_jac_t = control_and_jacobian(net, potential_fn, process, x_in, code, step, through_g=through_g,
                                      differentiable=differentiable, low_rank=prefers_low_rank(net, x_in.shape[-1]),
                                      needs_score=needs_score)
    x_next = x_in + dt[:, None] * (0.5 * sigma[:, None] * u + 0.5 * beta[:, None] * x_in)
    if isinstance(u_jac_t, lowrank.DiagPlusLowRank):
        scale, shift = 0.5 * dt * sigma, 1.0 + 0.5 * dt * beta
        if u_jac_t.diag.shape[0] == 1 and bool((shift == shift[0]).all() & (scale == scale[0]).all()):
            shift, scale_diag = shift[:1], scale[:1]  # shared by the batch: the diagonal stays one row
        else:
            scale_diag = scale
        jac_t = lowrank.DiagPlusLowRank(shift[:, None] + scale_diag[:, None] * u_jac_t.diag, u_jac_t.left,
                                        scale[:, None, None] * u_jac_t.core, u_jac_t.right)
        # a (nearly) vanishing diagonal entry cannot be inverted: such matrices are formed densely
        return u, x_next, jac_t if bool(lowrank.well_conditioned(jac_t).all()) else lowrank.as_dense(jac_t)
    # the transposed step Jacobian (same determinant and trace): scale, then add the diagonal in place
    jac_t = (0.5 * dt * sigma)[:, None, None] * u_jac_t
    jac_t.diagonal(dim1=-2, dim2=-1).add_((1.0 + 0.5 * dt * beta)[:, None])
    return u, x_next, jac_t


def ode_step(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x: torch.Tensor,
    code,
    step,
    *,
    log_det: str = "exact",
    num_probes: int = 1,
    differentiable: bool = False,
    langevin_grad: bool | None = None,
    generator: torch.Generator | None = None,
    return_jacobian: bool = False,
) -> StepOutput:
    r"""
    One Euler step of the PF-ODE from code ``code`` to ``code - step`` (both numbers or
    ``(batch,)`` tensors) with its log-determinant increment (module docstring).

    :param bool differentiable: keep the autograd graph of the output (to network parameters and,
        if ``x`` requires grad, to ``x``). When false the outputs are detached.
    :param bool langevin_grad: differentiate through the Langevin input :math:`g(x)` (Hessian
        terms of the potential). Default: only for ``log_det="exact"``. The values are the same
        either way; only derivatives of the output with respect to ``x`` change.

    :param bool return_jacobian: also return the step's Jacobian (exact log-det modes only).

    Networks with a closed-form Jacobian (:attr:`~pyro_osds.ops.nets.ControlNetwork.closed_form_jacobian`)
    get the exact log-determinant from it; others by ``dim`` backward passes.
    """
    check_choice("log_det", log_det, LOG_DET_METHODS)
    if return_jacobian and log_det not in EXACT_LOG_DET_METHODS:
        raise ValueError(f"`return_jacobian` needs an exact `log_det`, got {log_det!r}.")
    # codes given as numbers say whether the step needs the target's score without reading the device
    numbers = isinstance(code, (int, float)) and isinstance(step, (int, float))
    needs_score = target_weight(process, code, step) != 0 if numbers else None
    code = _as_code(code, x)
    step = _as_code(step, x)
    with torch.enable_grad():
        x_in = x if (differentiable and x.requires_grad) else x.detach().requires_grad_(True)
        through_g = log_det == "exact" if langevin_grad is None else langevin_grad
        if log_det == "exact" and not through_g:
            raise ValueError("`log_det='exact'` differentiates through the Langevin input; use "
                             "`log_det='exact_frozen_langevin'` to hold it constant.")
        sign, jacobian = None, None
        structured = net.closed_form_jacobian and log_det in EXACT_LOG_DET_METHODS + ("euler_trace",)
        if structured:
            u, x_next, jac = _structured_step(net, potential_fn, process, x_in, code, step,
                                              through_g=through_g, differentiable=differentiable,
                                              needs_score=needs_score)
            if log_det == "euler_trace":
                # Euler rule: dt * div(drift) = trace(J - I) of the step's Jacobian with g held constant
                increment = lowrank.trace(jac) - x.shape[-1]
            else:
                if differentiable and return_jacobian and isinstance(jac, torch.Tensor):
                    # training: the LU factors of the determinant also serve the path gradient's solves
                    sign, increment, jac = lowrank.slogdet_with_factors(jac)
                else:
                    # drawing (not differentiable): the determinant in float64, as the weights are (base_log_q)
                    sign, increment = lowrank.slogdet(jac if differentiable else lowrank.to_dtype(jac, torch.float64))
                jacobian = lowrank.transposed(jac) if return_jacobian else None
        else:
            u, x_next = _step_graph(net, potential_fn, process, x_in, code, step, through_g=through_g)
            if log_det in EXACT_LOG_DET_METHODS:
                jac = batched_jacobian(x_next, x_in, create_graph=differentiable)
                sign, increment = torch.linalg.slogdet(jac if differentiable else jac.to(torch.float64))
                jacobian = jac if return_jacobian else None
            elif log_det in ("euler_trace", "hutchinson"):
                if log_det == "euler_trace":
                    trace = exact_trace(u, x_in, create_graph=differentiable)
                else:
                    probes = rademacher((num_probes,) + tuple(x.shape), dtype=x.dtype, device=x.device,
                                        generator=generator)
                    trace, _ = hutchinson_trace(u, x_in, probes, create_graph=differentiable)
                dt = step / process.grid_size
                increment = dt * (0.5 * process.beta(code) * x.shape[-1] + 0.5 * process.sigma(code) * trace)
            else:
                increment = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if not differentiable:
        x_next, increment, u = x_next.detach(), increment.detach(), u.detach()
    if sign is not None:
        sign = sign.detach()
    if jacobian is not None and not differentiable:
        jacobian = lowrank.detach(jacobian)
    return StepOutput(x_next, increment, sign, u, x_in, jacobian)


def fold_penalty(jacobian: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    r"""
    Per-draw penalty that unfolds a step where its Jacobian :math:`J` has a negative determinant:

    .. math:: P = \max\big(0, -\lambda_{\min}(\tfrac12(J + J^\top))\big)\,[\det J \le 0].

    A matrix whose symmetric part is positive definite has eigenvalues with positive real parts and
    so a positive determinant; a folded draw (:math:`\det J < 0`) has
    :math:`\lambda_{\min} < 0`, and raising it to zero restores the orientation. Draws that are not
    folded get zero, so the penalty constrains nothing where the map is injective. ``jacobian`` is
    ``(batch, dim, dim)`` (or its transpose) or a :class:`~pyro_osds.ops.lowrank.DiagPlusLowRank` (formed
    densely for the folded draws only), ``sign`` the determinant's sign, ``(batch,)``.
    """
    penalty = torch.zeros(sign.shape, dtype=jacobian.diag.dtype if isinstance(jacobian, lowrank.DiagPlusLowRank)
                          else jacobian.dtype, device=sign.device)
    folded = sign <= 0
    if bool(folded.any()):
        jac = lowrank.as_dense(lowrank.select(jacobian, folded))
        smallest = torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(-1, -2)))[..., 0]
        penalty = penalty.masked_scatter(folded, torch.relu(-smallest))
    return penalty


def flow(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    num_steps: int,
    *,
    log_det: str = "exact",
    num_probes: int = 1,
    differentiable: bool = False,
    langevin_grad: bool | None = None,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
    with_fold_penalty: bool = False,
    return_jacobians: bool = False,
) -> FlowOutput:
    r"""
    Carries prior draws ``x0`` to the target with ``num_steps`` equal PF-ODE Euler steps
    (:math:`d = T/K` codes each), accumulating the log-determinant of the whole map:

    .. math:: \log q(x_K) = \log p_0(x_0) - \sum_{k} \log|\det \partial F_{c_k}(x_k)/\partial x_k| .

    ``with_fold_penalty`` (exact log-det modes) also sums :func:`fold_penalty` over the steps.
    """
    d = process.step_codes(num_steps)
    penalty = None
    x = x0
    # drawing accumulates the log-det in float64 (hundreds of nats in float32 are off by ~1e-5)
    total = torch.zeros(x0.shape[0], dtype=x0.dtype if differentiable else torch.float64, device=x0.device)
    orientation = None
    trajectory = [x0] if return_trajectory else None
    jacobians = [] if return_jacobians else None
    for k in range(num_steps):
        out = ode_step(
            net, potential_fn, process, x, process.grid_size - k * d, d,
            log_det=log_det, num_probes=num_probes, differentiable=differentiable, langevin_grad=langevin_grad,
            generator=generator, return_jacobian=with_fold_penalty or return_jacobians,
        )
        x = out.x
        total = total + out.log_abs_det
        if out.sign is not None:
            orientation = out.sign if orientation is None else orientation * out.sign
        if with_fold_penalty:
            step_penalty = fold_penalty(out.jacobian, out.sign)
            penalty = step_penalty if penalty is None else penalty + step_penalty
        if trajectory is not None:
            trajectory.append(x)
        if jacobians is not None:
            jacobians.append(out.jacobian)
    return FlowOutput(x, total, orientation, trajectory, penalty, jacobians)


def count_folded(orientation: torch.Tensor | None) -> torch.Tensor:
    """
    Marks draws whose Jacobian orientation (``+1``/``-1``/``0``) differs from the majority's, or
    is zero: evidence that the map folds (is not injective). ``None`` (no exact log-det) gives
    ``None``.
    """
    if orientation is None:
        return None
    majority = 1.0 if float(orientation.sum()) >= 0 else -1.0
    return orientation != majority
