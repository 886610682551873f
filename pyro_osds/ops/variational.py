# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The ELBO of a map pushed forward from :math:`\mathcal N(0, I)` (:func:`gaussian_elbo`, :func:`elbo_on_draws`), and a
quick mean-field Gaussian variational fit (:func:`fit_mean_field`), used to **compare parameterisations** of one
model by their ELBO and as a start of the preconditioner's Gaussian fit.

Two parameterisations of the same model (e.g. centred and non-centred random effects) have the same evidence
:math:`\log Z`, so the one whose best diagonal Gaussian :math:`q = \mathcal N(m, \mathrm{diag}(s^2))` reaches the
higher ELBO :math:`\mathbb E_q[-U] + \mathbb H[q] \le \log Z` is the one a Gaussian-started sampler finds easier:
the criterion of variationally inferred parameterisations [1]. :func:`fit_mean_field` maximises

.. math::

    \mathcal L(m, \log s) = \mathbb E_{\varepsilon\sim\mathcal N(0, I)}\big[-U(m + s\odot\varepsilon)\big]
    + \textstyle\sum_i \log s_i + \tfrac D2 \log(2\pi e)

by Adam on reparameterised draws, averages the second half of the iterates (Polyak), and estimates the ELBO with its
standard error on fresh draws.

**References**

[1] `Automatic Reparameterisation of Probabilistic Programs`, M. I. Gorinova, D. Moore, M. D. Hoffman (2020), ICML.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util import PotentialFn, check_positive_int
from .affine import AffineMap

__all__ = ["MeanFieldFit", "elbo_on_draws", "fit_mean_field", "gaussian_elbo", "log_weights_on_draws"]


def gaussian_elbo(
    potential_fn: PotentialFn, affine, num_samples: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r"""Monte-Carlo ELBO of the preconditioner's push-forward :math:`q` of :math:`\mathcal N(0, I)` (for an
    :class:`AffineMap`, :math:`q = \mathcal N(m, LL^\top)`): :math:`\mathbb E_q[-U(x)] + \mathbb H[q]` (non-finite
    draws give :math:`-\infty`)."""
    dim = affine.shift.numel()
    eps = torch.randn(num_samples, dim, dtype=affine.shift.dtype, device=affine.shift.device, generator=generator)
    return elbo_on_draws(potential_fn, affine, eps)


def log_weights_on_draws(potential_fn: PotentialFn, preconditioner, eps: torch.Tensor) -> torch.Tensor:
    r"""The log-weights :math:`-U(x) - \log q(x)` ``(N,)`` of the preconditioner's push-forward :math:`q` at
    :math:`x = T(\varepsilon)` for the given standard normal draws ``eps`` ``(N, D)`` (non-finite ones
    :math:`-\infty`)."""
    with torch.no_grad():
        x, log_abs_det = preconditioner.forward_and_log_abs_det(eps)
        u = potential_fn(x)
    log_q = -0.5 * (eps * eps).sum(-1) - 0.5 * eps.shape[-1] * math.log(2 * math.pi) - log_abs_det
    log_w = -u - log_q
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def elbo_on_draws(potential_fn: PotentialFn, preconditioner, eps: torch.Tensor) -> torch.Tensor:
    r"""The ELBO of :func:`gaussian_elbo` on the given standard normal draws ``eps`` ``(N, D)``: common draws
    compare fits, not noise."""
    return log_weights_on_draws(potential_fn, preconditioner, eps).mean()


class MeanFieldFit(NamedTuple):
    """The fitted ``loc`` and ``scale`` ``(D,)``, the ELBO estimate and its standard error (``-inf`` and ``0``
    when a check draw's potential is not finite)."""

    loc: torch.Tensor
    scale: torch.Tensor
    elbo: float
    se: float

    @property
    def affine(self) -> AffineMap:
        """The fit as an :class:`~pyro_osds.ops.affine.AffineMap` (a diagonal ``scale_tril``)."""
        return AffineMap(self.loc, torch.diag(self.scale))


def fit_mean_field(
    potential_fn: PotentialFn,
    init: torch.Tensor,
    *,
    init_scale: float = 0.1,
    num_iterations: int = 200,
    batch_size: int = 32,
    learning_rate: float = 0.05,
    num_check_draws: int = 512,
    generator: torch.Generator | None = None,
) -> MeanFieldFit:
    r"""
    The diagonal Gaussian fit of the module docstring, started at ``init`` ``(D,)`` with every scale ``init_scale``.

    Draws with a non-finite potential are dropped from each gradient estimate (a step with none is skipped); the
    final ELBO counts them as :math:`-\infty`, so a fit whose :math:`q` puts mass where the potential is not
    finite loses any comparison.

    :param potential_fn: the batched potential :math:`U: (N, D) \to (N,)`.
    :returns: :class:`MeanFieldFit`.
    """
    check_positive_int("num_iterations", num_iterations)
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_check_draws", num_check_draws)
    dim = init.numel()
    loc = init.detach().clone().reshape(dim).requires_grad_(True)
    log_scale = torch.full_like(loc, math.log(init_scale)).requires_grad_(True)
    opt = torch.optim.Adam([loc, log_scale], lr=learning_rate)
    start_average = num_iterations // 2
    sum_loc, sum_log_scale, count = torch.zeros_like(loc), torch.zeros_like(loc), 0
    for it in range(num_iterations):
        with torch.enable_grad():
            eps = torch.randn(batch_size, dim, dtype=loc.dtype, device=loc.device, generator=generator)
            u = potential_fn(loc + log_scale.exp() * eps)
            ok = torch.isfinite(u)
            if bool(ok.any()):
                loss = u[ok].mean() - log_scale.sum()
                opt.zero_grad()
                loss.backward()
                if torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all():
                    opt.step()
        if it >= start_average:
            sum_loc += loc.detach()
            sum_log_scale += log_scale.detach()
            count += 1
    fit = MeanFieldFit(sum_loc / count, (sum_log_scale / count).exp(), -math.inf, 0.0)
    eps = torch.randn(num_check_draws, dim, dtype=loc.dtype, device=loc.device, generator=generator)
    log_w = log_weights_on_draws(potential_fn, fit.affine, eps)
    if not bool(torch.isfinite(log_w).all()):
        return fit
    log_w = log_w.to(torch.float64)
    return fit._replace(elbo=float(log_w.mean()), se=float(log_w.std() / math.sqrt(num_check_draws)))
