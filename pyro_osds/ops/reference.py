# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Reference (noising) process, time grid and prior of the diffusion sampler.

The reference process is the variance-preserving Ornstein--Uhlenbeck SDE with stationary law
:math:`\mathcal N(0, \sigma_0^2 I)`, written in normalised noising time :math:`\tau \in [0, 1]`:

.. math::

    \mathrm dX_\tau = -\tfrac12 \beta(\tau) X_\tau \,\mathrm d\tau + \sigma_0 \sqrt{\beta(\tau)}\,\mathrm dW_\tau .

Generation runs backwards along an integer grid of *codes* :math:`c \in \{0, \dots, T\}` with
:math:`\tau = c / T`: from :math:`c = T` (prior) to :math:`c = 0` (target).  A sampler with
:math:`K` steps uses steps of :math:`d = T / K` codes, i.e. :math:`\Delta = d / T = 1 / K`.
The diffusion scale used everywhere is :math:`\sigma(c) = \sigma_0 \sqrt{\beta(c / T)}`.

Schedules (both with :math:`\beta(0) = \sigma_{\min}/2` and :math:`\beta(1) \approx \sigma_{\max}/2`):

* ``"cosine"`` (the OSDS code's default):
  :math:`\beta(\tau) = \tfrac12(\sigma_{\max} - \sigma_{\min})\cos^2\!\big(\tfrac\pi2 \tfrac{1 + s - \tau}{1 + s}\big) + \tfrac12 \sigma_{\min}`,
* ``"linear"``: :math:`\beta(\tau) = \tfrac12\big(\sigma_{\min} + (\sigma_{\max} - \sigma_{\min})\tau\big)`.

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, P. Jutras-Dubé, J. Zhang,
    Z. Wang, R. Zhang (2025), arXiv 2512.05251.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..util import check_choice, check_number, check_positive_int

__all__ = ["SCHEDULES", "ReferenceProcess", "cosine_beta", "linear_beta"]

SCHEDULES = ("cosine", "linear")


def cosine_beta(tau, sigma_min: float, sigma_max: float, s: float):
    r"""Cosine :math:`\beta(\tau)` of the OSDS code (see the module docstring); tensor or float."""
    angle = 0.5 * math.pi * (1.0 + s - tau) / (1.0 + s)
    cos = torch.cos(angle) if isinstance(angle, torch.Tensor) else math.cos(angle)
    return 0.5 * (sigma_max - sigma_min) * cos**2 + 0.5 * sigma_min


def linear_beta(tau, sigma_min: float, sigma_max: float):
    r"""Linear :math:`\beta(\tau) = \tfrac12(\sigma_{\min} + (\sigma_{\max} - \sigma_{\min})\tau)`."""
    return 0.5 * (sigma_min + (sigma_max - sigma_min) * tau)


@dataclass(frozen=True)
class ReferenceProcess:
    r"""
    The VP/OU reference process on a grid of ``grid_size`` codes, and its prior
    :math:`p_0 = \mathcal N(0, \sigma_0^2 I)`.

    :param int grid_size: number :math:`T` of fine grid steps (codes ``0..T``; 32, the paper's 128).
    :param str schedule: ``"cosine"`` (default, as in the OSDS code) or ``"linear"``.
    :param float sigma_min: schedule parameter :math:`\sigma_{\min}` (0.01).
    :param float sigma_max: schedule parameter :math:`\sigma_{\max}` (10).
    :param float cosine_s: offset :math:`s` of the cosine schedule (0.008).
    :param float prior_scale: :math:`\sigma_0`, standard deviation of the prior.
    :param prior_clip: clip *training* prior draws to :math:`\pm` ``prior_clip`` :math:`\sigma_0`
        (4 in the paper's code) or ``None``. Evaluation draws are never clipped: a clipped
        Gaussian has atoms, and its density would not be the :math:`p_0` in the weights.
    :param str langevin_time: where within a step from :math:`c` to :math:`c - d` the Langevin
        input's interpolation weight is taken: ``"start"`` (:math:`c/T`, the OSDS code) or ``"end"``
        (:math:`(c - d)/T`). The two differ by :math:`O(1/T)` on the fine grid, but with
        ``"start"`` a one-step map (:math:`c = T`) sees only the prior score, while with ``"end"``
        it sees the target's score.
    """

    grid_size: int = 32
    schedule: str = "cosine"
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    cosine_s: float = 0.008
    prior_scale: float = 1.0
    prior_clip: float | None = 4.0
    langevin_time: str = "start"

    def __post_init__(self):
        check_positive_int("grid_size", self.grid_size)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_number("sigma_min", self.sigma_min, low=0, low_open=True)
        check_number("sigma_max", self.sigma_max, low=0, low_open=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"Need `sigma_min` < `sigma_max`, got {self.sigma_min!r} and {self.sigma_max!r}.")
        check_number("cosine_s", self.cosine_s, low=0)
        check_number("prior_scale", self.prior_scale, low=0, low_open=True)
        if self.prior_clip is not None:
            check_number("prior_clip", self.prior_clip, low=0, low_open=True)
        check_choice("langevin_time", self.langevin_time, ("start", "end"))

    # ----------------------------------------------------------------------------------------
    # schedule
    def beta(self, code):
        r""":math:`\beta(c / T)` for a code: a float for a number, a tensor for a tensor (codes may be fractional)."""
        tau = code / self.grid_size if isinstance(code, torch.Tensor) else float(code) / self.grid_size
        if self.schedule == "cosine":
            return cosine_beta(tau, self.sigma_min, self.sigma_max, self.cosine_s)
        return linear_beta(tau, self.sigma_min, self.sigma_max)

    def sigma(self, code):
        r""":math:`\sigma(c) = \sigma_0 \sqrt{\beta(c / T)}` (float or tensor, like :meth:`beta`)."""
        beta = self.beta(code)
        return self.prior_scale * (beta.sqrt() if isinstance(beta, torch.Tensor) else math.sqrt(beta))

    def step_codes(self, num_steps: int) -> int:
        """Size :math:`d = T / K` (in codes) of each of ``num_steps`` equal steps; the one check that
        ``num_steps`` divides ``grid_size``."""
        check_positive_int("num_steps", num_steps)
        if self.grid_size % num_steps:
            divisors = [k for k in range(1, self.grid_size + 1) if self.grid_size % k == 0]
            raise ValueError(
                f"`num_steps`={num_steps} does not divide the fine grid `grid_size`={self.grid_size}; "
                f"use one of {divisors}."
            )
        return self.grid_size // num_steps

    # ----------------------------------------------------------------------------------------
    # prior
    def sample_prior(
        self,
        num_samples: int,
        dim: int,
        *,
        clip: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        r"""
        Draws ``(num_samples, dim)`` from :math:`\mathcal N(0, \sigma_0^2 I)`, optionally clipped
        to :math:`\pm` ``prior_clip`` :math:`\sigma_0` (training only).
        """
        x = torch.randn(num_samples, dim, dtype=dtype, device=device, generator=generator)
        x = x * self.prior_scale
        if clip and self.prior_clip is not None:
            bound = self.prior_clip * self.prior_scale
            x = x.clamp(-bound, bound)
        return x

    def prior_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p_0(x)` for ``x`` of shape ``(batch, dim)``; returns ``(batch,)``."""
        dim = x.shape[-1]
        var = self.prior_scale**2
        return -0.5 * (x * x).sum(-1) / var - 0.5 * dim * math.log(2 * math.pi * var)

    def prior_score(self, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\nabla \log p_0(x) = -x / \sigma_0^2`."""
        return -x / self.prior_scale**2
