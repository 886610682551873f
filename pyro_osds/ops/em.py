# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The stochastic Euler--Maruyama (EM) rollout of the controlled SDE (the notation of :mod:`~pyro_osds.ops.integrate`):

* generative EM kernel: :math:`x' \sim \mathcal N\big(x + \Delta(\sigma u_\theta + \tfrac12\beta x), \sigma^2\Delta I\big)`;
* backward (noising) EM kernel: :math:`x \sim \mathcal N\big((1 - \tfrac12\beta\Delta)x', \sigma^2\Delta I\big)`.

The diffusion-sampler loss trains on its paths (:mod:`~pyro_osds.ops.losses`), and its path weights are the
estimator the diffusion-sampler papers use, consistent only as the step count grows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util import PotentialFn
from .integrate import langevin_input
from .jacobian import potential_and_score
from .reference import ReferenceProcess

__all__ = ["EMRollout", "em_log_weights", "em_rollout"]


class EMRollout(NamedTuple):
    """
    Stochastic EM path: ``states`` of shape ``(num_steps + 1, batch, dim)`` from prior to target,
    and the summed log densities of the generative (``log_forward``) and noising
    (``log_backward``) kernels, each ``(batch,)``.
    """

    states: torch.Tensor
    log_forward: torch.Tensor
    log_backward: torch.Tensor


def em_rollout(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    num_steps: int,
    *,
    states: torch.Tensor | None = None,
    differentiable: bool = False,
    generator: torch.Generator | None = None,
) -> EMRollout:
    r"""
    Stochastic Euler--Maruyama rollout of the controlled SDE with ``num_steps`` steps, returning
    the states and the summed log densities of the generative and noising kernels.

    With ``states`` given (shape ``(num_steps + 1, batch, dim)``), no noise is drawn: the kernels
    are evaluated along those fixed states (used by the log-variance loss). Otherwise the path is
    sampled, reparameterised when ``differentiable`` (gradients flow through the states).

    The Langevin input is held constant (stop-gradient), as in the OSDS code.

    .. math::

        \log w_{\rm EM} = \sum_k \big[\log B(x_k \mid x_{k+1}) - \log F(x_{k+1} \mid x_k)\big]
            + \log\rho(x_K) - \log p_0(x_0).
    """
    d = process.step_codes(num_steps)
    T = process.grid_size
    dt = d / T
    dim = x0.shape[-1]
    const = 0.5 * dim * math.log(2 * math.pi)
    codes = [float(T - k * d) for k in range(num_steps)]
    x = x0 if states is None else states[0]
    path = [x]
    log_f = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    log_b = torch.zeros_like(log_f)
    grad_ctx = torch.enable_grad() if differentiable else torch.no_grad()
    with grad_ctx:
        t_all = torch.tensor(codes, dtype=x0.dtype, device=x0.device) / T
        features = net.step_features(t_all, torch.full_like(t_all, dt))
    for k, code in enumerate(codes):
        beta = process.beta(code)
        sigma = process.sigma(code)
        std = sigma * math.sqrt(dt)
        _, score = potential_and_score(potential_fn, x)
        g = langevin_input(process, x.detach(), code, score, d)
        with grad_ctx:
            if features is None:
                u = net(x, t_all[k], dt, g)
            else:
                u = net(x, None, None, g, features=tuple(f[k : k + 1] for f in features))
            mean_f = x + dt * (sigma * u + 0.5 * beta * x)
            if states is None:
                noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                x_next = mean_f + std * noise
            else:
                x_next = states[k + 1]
            log_f = log_f - 0.5 * (((x_next - mean_f) / std) ** 2).sum(-1)
            mean_b = (1.0 - 0.5 * beta * dt) * x_next
            log_b = log_b - 0.5 * (((x - mean_b) / std) ** 2).sum(-1)
        x = x_next
        path.append(x)
    # the Gaussian normalisers of F and B are equal step by step and cancel in log B - log F;
    # they are added to both sums so that each is a true log density
    norm = sum(dim * math.log(process.sigma(c) * math.sqrt(dt)) + const for c in codes)
    return EMRollout(torch.stack(path), log_f - norm, log_b - norm)


def em_log_weights(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""
    Detached float64 path log-weights :math:`\log w_{\rm EM}` (:func:`em_rollout`) of stochastic
    ``num_steps``-step paths from prior draws ``x0``: the estimator the diffusion-sampler papers use,
    which is consistent only as the step count grows (what breaks at few steps).
    """
    path = em_rollout(net, potential_fn, process, x0, num_steps, generator=generator)
    with torch.no_grad():
        u = potential_fn(path.states[-1])
    lw = path.log_backward - path.log_forward - u - process.prior_log_prob(x0)
    return lw.detach().to(torch.float64)
