# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The marginal-mixture preconditioner: for posteriors with more separated modes than a mode search can
enumerate, such as products of independent multimodal factors (:math:`2^{16}` modes for many-well 32-D).

One Gaussian preconditioner sits in one mode, and reverse-KL training of a smooth one-step map cannot
split mass across a barrier afterwards (the map would need a slope :math:`e^{\Delta U}` times steeper
across the barrier than in the wells). This preconditioner is a bijection that does the splitting itself,
coordinate by coordinate:

.. math::

    x = m + s \odot M(y), \qquad M_i(y_i) = F_i^{-1}\big(\Phi(y_i)\big), \qquad
    F_i(u) = \textstyle\sum_{k} \pi_{ik}\, \sigma\big((u - \mu_{ik}) / s_{ik}\big),

so a standard normal :math:`y` becomes, in every coordinate, a one-dimensional mixture of logistic
distributions (the quantile transform), with :math:`\log|\det \partial x/\partial y| = \sum_i \log s_i + \log\varphi(y_i) -
\log f_i(M_i(y_i))` exactly. Its inverse :math:`y_i = \Phi^{-1}(F_i(u_i))` is closed-form; the forward map
solves :math:`G_i(u) = \Phi^{-1}(F_i(u)) = y_i` by safeguarded Newton steps (the root is bracketed by the
smallest and the largest component quantile at level :math:`\Phi(y_i)`) and then takes two
more Newton steps inside the autograd graph: the first makes first derivatives exact, the second second
derivatives (the error of Newton's iterates squares at each step), which the Langevin input of multi-step
flows needs.

Logistic rather than Gaussian components: their exponential tails cover the soft flanks of a well (its side
towards a barrier, where the density falls slower than a Gaussian fitted to the well), so the standard errors
stay calibrated (the measurements: docs, "Design notes").

:func:`fit_marginal_mixture` fits it by importance-weighted EM (a mass-covering, forward-KL fit of each
coordinate's marginal), started from the marginals of the modes the search found: the heavier wells get
the mass the weights say they hold, whatever share the search's sample of modes gave them. The flow is then
trained on the potential pulled back through the map, as on any preconditioned potential.

**References**

[1] `Adaptive importance sampling in general mixture classes`, O. Cappé, R. Douc, A. Guillin, J.-M. Marin,
    C. P. Robert (2008), Statistics and Computing 18(4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util import PotentialFn, check_positive_int

__all__ = ["MarginalMixtureMap", "fit_marginal_mixture", "mixture_marginals"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _std_normal_log_pdf(y: torch.Tensor) -> torch.Tensor:
    return -0.5 * y * y - _LOG_SQRT_2PI


def _standard_quantile_and_log_density(u: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor,
                                       log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`G(u) = \Phi^{-1}(F(u))` (from the smaller of :math:`F` and :math:`1 - F`, so that neither tail loses
    precision) and :math:`\log f(u)`, elementwise for ``u`` ``(batch, D)`` and mixtures ``(D, K)`` of logistic
    components."""
    log_pi = logits - logits.logsumexp(-1, keepdim=True)
    std = (u.unsqueeze(-1) - loc) / log_scale.exp()
    log_cdf_k, log_sf_k = torch.nn.functional.logsigmoid(std), torch.nn.functional.logsigmoid(-std)
    log_cdf = (log_pi + log_cdf_k).logsumexp(-1)
    log_sf = (log_pi + log_sf_k).logsumexp(-1)
    g = torch.where(log_cdf < log_sf, torch.special.ndtri(log_cdf.exp()), -torch.special.ndtri(log_sf.exp()))
    log_f = (log_pi + log_cdf_k + log_sf_k - log_scale).logsumexp(-1)
    return g, log_f


def _component_quantiles(y: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    r"""Each logistic component's quantile at level :math:`\Phi(y)`: ``(batch, D, K)``, which bracket the mixture's."""
    logit = torch.special.log_ndtr(y) - torch.special.log_ndtr(-y)
    return loc + log_scale.exp() * logit.unsqueeze(-1)


#: a logistic component's variance is this times its scale squared
_LOGISTIC_VARIANCE = math.pi**2 / 3


class MarginalMixtureMap(NamedTuple):
    r"""
    :math:`x = m + s \odot M(y)` (module docstring): ``shift`` :math:`m` and ``scale`` :math:`s` ``(D,)``, and
    each coordinate's mixture of logistic components as ``logits``, ``loc`` and ``log_scale`` ``(D, K)``. Same interface as
    :class:`~pyro_osds.ops.affine.AffineMap`: call it, :meth:`inverse`, :meth:`forward_and_log_abs_det`.
    """

    shift: torch.Tensor
    scale: torch.Tensor
    logits: torch.Tensor
    loc: torch.Tensor
    log_scale: torch.Tensor

    @property
    def mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.logits, self.loc, self.log_scale

    def quantile(self, y: torch.Tensor) -> torch.Tensor:
        r""":math:`M(y)`, differentiable to second order in ``y`` and the mixture (module docstring)."""
        tol = 1e-11 if y.dtype == torch.float64 else 1e-4
        with torch.no_grad():
            ends = _component_quantiles(y.detach(), self.loc, self.log_scale)
            lo, hi = ends.min(-1).values, ends.max(-1).values
            u = 0.5 * (lo + hi)
            for _ in range(100):
                g, log_f = _standard_quantile_and_log_density(u, *self.mixture)
                residual = g - y
                if not bool((residual.abs() > tol).any()):
                    break
                hi = torch.where(residual > 0, u, hi)
                lo = torch.where(residual > 0, lo, u)
                newton = u - residual * (_std_normal_log_pdf(g) - log_f).exp()
                inside = (newton > lo) & (newton < hi)
                u = torch.where(inside, newton, 0.5 * (lo + hi))
        u = u.detach()
        for _ in range(2):  # in the graph: exact first, then second derivatives
            g, log_f = _standard_quantile_and_log_density(u, *self.mixture)
            u = u - (g - y) * (_std_normal_log_pdf(g) - log_f).exp()
        return u

    def forward_and_log_abs_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(x, log|det dx/dy|)`` for ``y`` ``(batch, D)``; the log-determinant ``(batch,)``."""
        u = self.quantile(y)
        _, log_f = _standard_quantile_and_log_density(u, *self.mixture)
        log_abs_det = (_std_normal_log_pdf(y) - log_f).sum(-1) + self.scale.log().sum()
        return self.shift + self.scale * u, log_abs_det

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.shift + self.scale * self.quantile(y)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`y = \\Phi^{-1}(F((x - m) / s))`, closed-form."""
        g, _ = _standard_quantile_and_log_density((x - self.shift) / self.scale, *self.mixture)
        return g

    def to(self, dtype=None, device=None) -> MarginalMixtureMap:
        return MarginalMixtureMap(*(t.to(dtype=dtype, device=device) for t in self))

    def state(self) -> dict:
        """The map's tensors by name (for checkpoints)."""
        return {"kind": "marginal_mixture", **{k: v.detach().clone() for k, v in self._asdict().items()}}


def _well_log_weights(log_mass: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    r"""
    Per coordinate and component, the log-weight of its well from the modes' Laplace log-masses, by the additive
    model :math:`\log m_j \approx c + \sum_i a_{i k(j, i)}` (exact for a product of independent factors, whose
    modes' masses multiply the wells' masses): ridge least squares in its dual form, so it also holds when the modes
    are fewer than the coefficients. ``log_mass`` ``(J,)`` (finite), ``member`` ``(J, D, K)`` one-hot; returns
    ``(D, K)`` (coefficients of components without a member are meaningless).
    """
    num_modes, dim, k = member.shape
    design = member.reshape(num_modes, dim * k)
    design = design - design.mean(0)
    target = log_mass - log_mass.mean()
    gram = design @ design.T
    ridge = 1e-8 * float(gram.diagonal().mean().clamp_min(1.0))
    dual = torch.linalg.solve(gram + ridge * torch.eye(num_modes, dtype=gram.dtype, device=gram.device), target)
    return (design.T @ dual).reshape(dim, k)


def mixture_marginals(modes: list, num_components: int, *, iterations: int = 30) -> MarginalMixtureMap:
    r"""
    The starting map of :func:`fit_marginal_mixture` from the modes a search found (``[(AffineMap, mass), ...]``,
    light ones included): the diagonal of the modes' covering Gaussian (unweighted) as shift and scale; in every
    (scaled) coordinate, ``num_components`` logistic components at the clusters of the modes' positions (1-D
    k-means, every mode counting once: the search's modes are a sample of where the wells are, and in a product of
    many multimodal factors all but the heaviest found are far lighter than it, yet each shows a well), each with its
    cluster's mean and variance (the modes' Laplace variances included). The components' weights come from the
    modes' Laplace masses through the additive model of :func:`_well_log_weights` (a product's mode weighs the
    product of its wells' masses), else, with one mode, its count; a component without a mode keeps a broad
    component of weight :math:`10^{-3}`.
    """
    check_positive_int("num_components", num_components)
    dtype, device = modes[0][0].shift.dtype, modes[0][0].shift.device
    mass = torch.tensor([float(w) for _, w in modes], dtype=torch.float64, device=device)
    centres = torch.stack([a.shift for a, _ in modes])  # (J, D)
    variances = torch.stack([(a.scale_tril * a.scale_tril).sum(-1) for a, _ in modes])  # diag(L L^T), (J, D)
    mean = centres.mean(0)
    scale = ((variances + centres**2).mean(0) - mean**2).clamp_min(1e-12).sqrt()
    c, v = (centres - mean) / scale, variances / scale**2
    # k-means started at evenly spaced quantiles of every coordinate
    order = c.argsort(0)
    levels = (torch.arange(num_components, dtype=c.dtype, device=device) + 0.5) / num_components
    index = (levels * c.shape[0]).long().clamp(max=c.shape[0] - 1).expand(c.shape[1], -1)
    loc = torch.gather(torch.gather(c, 0, order).T, 1, index)  # (D, K)
    for _ in range(iterations):
        member = torch.nn.functional.one_hot((c.unsqueeze(-1) - loc).abs().argmin(-1), num_components).to(c.dtype)
        count = member.sum(0)  # (D, K)
        moved = (member * c.unsqueeze(-1)).sum(0) / count.clamp_min(1)
        loc = torch.where(count > 0, moved, loc)
    member = torch.nn.functional.one_hot((c.unsqueeze(-1) - loc).abs().argmin(-1), num_components).to(c.dtype)
    count = member.sum(0)
    var = (member * (v.unsqueeze(-1) + (c.unsqueeze(-1) - loc) ** 2)).sum(0)
    var = torch.where(count > 0, var / count.clamp_min(1), torch.ones_like(var))
    weighed = mass > 0  # light enough to underflow: a position, but no mass to regress on
    if int(weighed.sum()) > 1:
        log_weight = _well_log_weights(mass[weighed].log(), member[weighed].to(torch.float64)).to(dtype)
        share = torch.softmax(torch.where(count > 0, log_weight, torch.full_like(log_weight, -math.inf)), -1)
    else:
        share = count / count.sum(-1, keepdim=True)
    logits = (share + 1e-3 / num_components).log()
    return MarginalMixtureMap(mean, scale, logits - logits.logsumexp(-1, keepdim=True), loc,
                              0.5 * (var.clamp_min(1e-6) / _LOGISTIC_VARIANCE).log())


def fit_marginal_mixture(
    potential_fn: PotentialFn,
    modes: list,
    *,
    num_components: int = 4,
    num_draws: int = 4000,
    max_rounds: int = 40,
    damping: float = 0.5,
    patience: int = 6,
    generator: torch.Generator | None = None,
) -> tuple[MarginalMixtureMap, dict]:
    r"""
    Importance-weighted EM for :class:`MarginalMixtureMap` [1], from :func:`mixture_marginals` of ``modes``:
    every round draws ``num_draws`` points :math:`x_n = T(y_n)`, :math:`y_n \sim \mathcal N(0, I)`, weights them
    by :math:`w_n \propto \rho(x_n)/q(x_n)` and moves each coordinate's mixture ``damping`` of the way to its
    weighted M-step (responsibilities :math:`r_{nik} \propto \pi_{ik} f_{ik}(u_{ni})` of the scaled coordinates
    :math:`u = (x - m)/s`; each component takes its responsibilities' weighted mean and variance, which is the
    M-step of a Gaussian and a moment match for a logistic: any proposal keeps the weights exact). Each coordinate's marginal is fitted in the forward-KL
    (mass-covering) sense, so a well keeps the share its weights give it. Stops when the fresh draws' ELBO
    has not improved for ``patience`` rounds; returns the map with the best ELBO and
    ``{"rounds", "elbo", "ess_per_draw"}`` of it, with every round's ``(elbo, ess_per_draw)`` in ``"history"``.
    """
    check_positive_int("num_draws", num_draws)
    check_positive_int("max_rounds", max_rounds)
    current = mixture_marginals(modes, num_components)
    dtype, device = current.shift.dtype, current.shift.device
    best, best_elbo, best_ess, since_best, rounds = current, -math.inf, 0.0, 0, 0
    history = []
    for _ in range(max_rounds):
        rounds += 1
        with torch.no_grad():
            y = torch.randn(num_draws, current.shift.numel(), dtype=dtype, device=device, generator=generator)
            x, log_abs_det = current.forward_and_log_abs_det(y)
            log_w = (-potential_fn(x) - _std_normal_log_pdf(y).sum(-1) + log_abs_det).to(torch.float64)
        finite = torch.isfinite(log_w)
        if int(finite.sum()) < 2:
            break
        elbo = float(log_w[finite].mean())
        share = torch.softmax(torch.where(finite, log_w, torch.full_like(log_w, -math.inf)), 0).to(dtype)
        ess = float(1.0 / (share.to(torch.float64) ** 2).sum()) / num_draws
        history.append((elbo, ess))
        if elbo > best_elbo + 1e-2:
            since_best = 0
        else:
            since_best += 1
        if elbo > best_elbo:
            best, best_elbo, best_ess = current, elbo, ess
        if since_best >= patience:
            break
        u = ((x - current.shift) / current.scale).unsqueeze(-1)  # (N, D, 1)
        std = (u - current.loc) / current.log_scale.exp()
        log_r = (current.logits + torch.nn.functional.logsigmoid(std) + torch.nn.functional.logsigmoid(-std)
                 - current.log_scale)
        r = torch.softmax(log_r, -1) * share[:, None, None]  # (N, D, K)
        r = torch.where(finite[:, None, None], r, torch.zeros_like(r))
        weight = r.sum(0)
        safe = weight.clamp_min(1e-300)
        loc = (r * u).sum(0) / safe
        var = (r * (u - loc) ** 2).sum(0) / safe
        keep = weight > 1e-8
        loc = torch.where(keep, loc, current.loc)
        log_scale = torch.where(keep, 0.5 * (var.clamp_min(1e-8) / _LOGISTIC_VARIANCE).log(), current.log_scale)
        logits = (weight + 1e-4 / num_components).log()
        logits = logits - logits.logsumexp(-1, keepdim=True)
        mix = lambda old, new: (1 - damping) * old + damping * new  # noqa: E731
        current = MarginalMixtureMap(current.shift, current.scale, mix(current.logits, logits),
                                     mix(current.loc, loc), mix(current.log_scale, log_scale))
    return best, {"rounds": rounds, "elbo": best_elbo, "ess_per_draw": best_ess, "history": history}
