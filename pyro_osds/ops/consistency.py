# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Consistency-distilled diffusion sampler (CDDS): a consistency function distilled from the
probability-flow ODE of a trained many-step diffusion sampler (DIS).

The teacher is a DIS control :math:`u_\phi` (trained on fine-grid EM paths, :func:`pyro_osds.ops.losses.diffusion_loss`);
its PF-ODE carries :math:`x_T \sim p_0` (code :math:`c = T`) to :math:`x_0` (code 0). The student is a
consistency function with the EDM skip parameterisation in the remaining time :math:`r = c/T`,

.. math::

    f_\theta(x, c) = c_{\rm skip}(r)\,x + c_{\rm out}(r)\,F_\theta(x, c), \qquad
    c_{\rm skip}(r) = \frac{\sigma_d^2}{r^2 + \sigma_d^2}, \quad
    c_{\rm out}(r) = \frac{\sigma_d\, r}{\sqrt{\sigma_d^2 + r^2}},

so :math:`f_\theta(x, 0) = x`. :math:`F_\theta` is the step-conditioned network of
:mod:`pyro_osds.ops.nets` (step size = the remaining time, Langevin input at :math:`c`), initialised from
the teacher. Training matches :math:`f_\theta` at consecutive points :math:`c_{n+1} > c_n` of a grid of
``consistency_points`` codes along teacher ODE trajectories simulated on the fly:

.. math:: \mathcal L_{\rm CD} = \mathbb E\,\big\|f_\theta(x_{c_{n+1}}, c_{n+1}) - f_{\theta^-}(x_{c_n}, c_n)\big\|^2 / D,

with :math:`\theta^-` the EMA of :math:`\theta`; with ``ema_decay=0`` (the method's default, as in the
CDDS paper) :math:`\theta^- = \operatorname{stopgrad}(\theta)`. A slow EMA target (decay 0.995) made
training at CPU budgets stall: the consistency has to propagate from :math:`f(x, 0) = x` up the grid
one interval at a time.

Sampling: one step :math:`x = f_\theta(x_T, T)` is a deterministic map, so its draws get **exact**
importance weights through :math:`\log|\det \partial f_\theta/\partial x_T|` (the CDDS paper's one-step
"ELBO" drops the volume term and is not a bound). Multi-step consistency sampling alternates
:math:`f_\theta` with re-noising by the reference process's marginal
:math:`x_c = s(c)\,x + \sigma_0\sqrt{1 - s(c)^2}\,\varepsilon`, :math:`s(c) = e^{-\frac12\int_0^{c/T}\beta}`; its
draws have no tractable density, hence no weights. The one-step map is inverted exactly by
Newton iterations (:func:`~pyro_osds.ops.inverse.newton_invert`), which gives its density at any
point (forward estimates).

**References**

[1] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dubé, P. Pynadath, R. Zhang (2025), arXiv 2502.07579.

[2] `Consistency Models`, Y. Song, P. Dhariwal, M. Chen, I. Sutskever (2023), arXiv 2303.01469.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util import PotentialFn, check_positive_int
from .integrate import control_and_jacobian, flow, langevin_input, target_weight
from .inverse import default_tolerance, newton_invert
from .jacobian import potential_and_score
from .reference import ReferenceProcess

__all__ = ["ConsistencyOutput", "consistency_function", "consistency_grid", "consistency_loss", "invert_consistency",
           "noise_to", "skip_scalings"]


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.unsqueeze(-1) if v.dim() == 1 else v


def skip_scalings(remaining: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(c_{\rm skip}(r), c_{\rm out}(r))` of the EDM skip parameterisation (module docstring)."""
    c_skip = sigma_data**2 / (remaining**2 + sigma_data**2)
    c_out = sigma_data * remaining / torch.sqrt(sigma_data**2 + remaining**2)
    return c_skip, c_out


def consistency_grid(grid_size: int, num_points: int) -> list[int]:
    """``min(num_points, grid_size + 1)`` integer codes from 0 to ``grid_size`` (both included), as evenly
    spaced as possible."""
    check_positive_int("consistency_points", num_points, minimum=2)
    num_points = min(num_points, grid_size + 1)
    return sorted({round(i * grid_size / (num_points - 1)) for i in range(num_points)})


class ConsistencyOutput(NamedTuple):
    r""":math:`f_\theta(x, c)`, and with ``with_volume=True`` the exact ``log_abs_det`` of
    :math:`\partial f_\theta/\partial x` and its ``sign`` (each ``(batch,)``; else ``None``)."""

    f: torch.Tensor
    log_abs_det: torch.Tensor | None
    sign: torch.Tensor | None


def consistency_function(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x: torch.Tensor,
    code,
    *,
    sigma_data: float = 0.5,
    with_volume: bool = False,
    return_jacobian: bool = False,
):
    r"""
    :math:`f_\theta(x, c)` for codes ``code`` (a number or ``(batch,)``), optionally with the exact
    :math:`\log|\det \partial f_\theta/\partial x|` (through the Langevin input), from the network's
    closed-form Jacobian (:func:`~pyro_osds.ops.integrate.control_and_jacobian` with a step of ``code``
    codes: the remaining time). ``return_jacobian`` returns the detached Jacobian
    :math:`\partial f_\theta/\partial x` ``(batch, dim, dim)`` instead.
    """
    T = process.grid_size
    batch, dim = x.shape
    code = torch.as_tensor(code, dtype=x.dtype, device=x.device).expand(batch)
    remaining = code / T
    c_skip, c_out = skip_scalings(remaining, sigma_data)
    with_jacobian = with_volume or return_jacobian
    with torch.enable_grad():
        x_in = x if x.requires_grad else x.detach().requires_grad_(with_jacobian)
        if not with_jacobian:
            weight = torch.as_tensor(target_weight(process, code, code), dtype=x.dtype, device=x.device)
            if bool((weight != 0).any()):
                _, score = potential_and_score(potential_fn, x_in)
            else:
                score = torch.zeros_like(x_in)
            g = langevin_input(process, x_in, code, score, code)
            u = net(x_in, remaining, remaining, g)
            return ConsistencyOutput(_col(c_skip) * x_in + _col(c_out) * u, None, None)
        u, u_jac_t = control_and_jacobian(net, potential_fn, process, x_in, code, code, through_g=True,
                                          differentiable=False)
        f = _col(c_skip) * x_in + _col(c_out) * u
        jac_t = c_out[:, None, None] * u_jac_t  # transposed Jacobian: same determinant
        jac_t.diagonal(dim1=-2, dim2=-1).add_(c_skip[:, None])
        if return_jacobian:
            return f.detach(), jac_t.transpose(-1, -2).detach()
        sign, logabsdet = torch.linalg.slogdet(jac_t)
    return ConsistencyOutput(f.detach(), logabsdet.detach(), sign.detach())


def invert_consistency(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    y: torch.Tensor,
    code,
    *,
    sigma_data: float = 0.5,
    tolerance: float | None = None,
    max_iterations: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The exact inverse :math:`x = f_\theta^{-1}(y)` of the consistency map at code ``code`` by Newton
    iterations (:func:`~pyro_osds.ops.inverse.newton_invert`). Returns ``(x, converged)``, the
    latter per row: the max-norm residual is below ``tolerance`` relative to :math:`1 + \max|y|`.
    """
    tolerance = default_tolerance(y.dtype) if tolerance is None else tolerance
    y = y.detach()

    def map_fn(z):
        return consistency_function(net, potential_fn, process, z, code, sigma_data=sigma_data).f.detach()

    def jacobian_fn(z):
        return consistency_function(net, potential_fn, process, z, code, sigma_data=sigma_data,
                                    return_jacobian=True)[1]

    x = newton_invert(map_fn, jacobian_fn, y, tolerance=tolerance, max_iterations=max_iterations)
    converged = (map_fn(x) - y).abs().amax(-1) <= tolerance * (1.0 + y.abs().amax(-1))
    return x, converged


def consistency_loss(
    student: torch.nn.Module,
    target: torch.nn.Module,
    teacher: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    codes: list[int],
    *,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, int]:
    """The consistency-distillation loss (module docstring) on teacher ODE trajectories from ``x0``.
    Returns ``(loss, num_invalid)``."""
    T = process.grid_size
    with torch.no_grad():
        path = flow(teacher, potential_fn, process, x0, T, log_det="none", return_trajectory=True).trajectory
    states = torch.stack(path)  # index i at code T - i
    batch = x0.shape[0]
    pair = torch.randint(len(codes) - 1, (batch,), device=x0.device, generator=generator)
    grid = torch.tensor(codes, device=x0.device)
    lo, hi = grid[pair], grid[pair + 1]
    rows = torch.arange(batch, device=x0.device)
    x_hi, x_lo = states[T - hi, rows], states[T - lo, rows]
    with torch.no_grad():
        target_f = consistency_function(target, potential_fn, process, x_lo, lo.to(x0.dtype), sigma_data=sigma_data).f
    with torch.enable_grad():
        pred = consistency_function(student, potential_fn, process, x_hi, hi.to(x0.dtype), sigma_data=sigma_data).f
        per_pair = ((pred - target_f) ** 2).mean(-1)
        valid = torch.isfinite(per_pair)
        if int(valid.sum()) < 2:
            return None, int((~valid).sum())
        return per_pair[valid].mean(), int((~valid).sum())


def noise_to(process: ReferenceProcess, x: torch.Tensor, code: float, *, generator=None) -> torch.Tensor:
    r"""Re-noises target-side states ``x`` (code 0) to code ``code`` with the reference marginal
    :math:`x_c = s\,x + \sigma_0\sqrt{1 - s^2}\,\varepsilon`, :math:`s = e^{-\frac12\int_0^{c/T}\beta}`."""
    tau = torch.linspace(0.0, code / process.grid_size, 2001, dtype=torch.float64, device="cpu")
    integral = float(torch.trapezoid(process.beta(tau * process.grid_size), tau))
    s = math.exp(-0.5 * integral)
    eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return s * x + process.prior_scale * math.sqrt(max(1.0 - s * s, 0.0)) * eps
