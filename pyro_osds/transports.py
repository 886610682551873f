# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Transports, and the one loop that draws and weights with them.

A *transport* is a trained sampler's map :math:`T` from base draws :math:`z_0 \sim p_0` to the
target's space, composed with the chain's affine preconditioner :math:`x = m + L\,T(z_0)`. It gives
each point the exact log density of the map actually applied,

.. math::

    \log q(x) = \log p_0(z_0) - \log\Big|\det\frac{\partial T}{\partial z_0}\Big| - \log|\det L|,

its orientation (the sign of the Jacobian determinant; a minority sign reveals a fold), and can
invert itself (:meth:`Transport.log_prob` at any point). :func:`draw` turns any transport into
weighted draws, :math:`\log w = -U(x) - \log q(x)`.

* :class:`FlowTransport`: ``K`` steps of the probability-flow ODE (:func:`~pyro_osds.ops.integrate.flow`);
* :class:`ConsistencyTransport`: CDDS's consistency function (one step; ``K > 1`` re-noises between
  steps and has no density);
* :class:`MixtureTransport`: a mixture :math:`q = \sum_k \alpha_k q_k` of transports whose draws are
  weighted by multiple importance sampling: against the whole mixture (the balance heuristic, the other
  components' densities from their inverses) or with a partition of unity (no other density needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from .ops.affine import AffineMap
from .ops.consistency import consistency_function, invert_consistency, noise_to
from .ops.integrate import LOG_DET_METHODS, count_folded, flow
from .ops.inverse import inverse_flow
from .ops.reference import ReferenceProcess
from .results import Draws
from .util import PotentialFn, check_choice, check_positive_int, tensor_on_its_device

__all__ = ["ConsistencyTransport", "EvaluationConfig", "FlowTransport", "MixtureTransport", "Transport",
           "TransportOutput", "draw"]


@dataclass(frozen=True)
class EvaluationConfig:
    r"""
    How fresh draws are made and weighted (flat option names in brackets).

    :param int num_steps: the flow step count :math:`K` of draws (``num_steps``; default ``None``: 1, or
        ``grid_size`` for DIS, :attr:`~pyro_osds.config.OSDSConfig.default_num_steps`); the one-step objective trains
        it alongside ``flow_kl_steps``.
    :param str log_det: ``"exact"`` (default; exact log-det of the discrete map through the Langevin
        term) or an approximate method for comparison (``eval_log_det``, see
        :data:`~pyro_osds.ops.integrate.LOG_DET_METHODS`).
    :param exact_log_det_max_dim: ``None`` (default): the exact log-det at every dimension (its cost is
        linear in the dimension for the one-step map, :mod:`~pyro_osds.ops.lowrank`). A number: above that
        dimension the default switches to Hutchinson, an approximation whose estimates are labelled as such
        (not a bound, never :attr:`~pyro_osds.results.LogEvidence.reliable`; :func:`~pyro_osds.compare`
        refuses them).
    :param int num_probes: Hutchinson probes per step (``eval_num_probes``, 16).
    :param int chunk_size: draws per batch when drawing and weighting (2048).
    :param int diagnostic_draws: weighted draws each chain makes once per trained state, besides the user's, to read
        its weights' tail from (``diagnostic_draws``, 16384; 0: each set of draws alone): the Pareto :math:`\hat k`
        behind :attr:`~pyro_osds.results.LogEvidence.reliable` and the relative variance behind the SE
        (:func:`~pyro_osds.ops.estimators.evidence`'s ``reference``). Made only for draws that are fewer and not
        nearly constant in weight (ESS/N below 0.99).
    :param dtype: the arithmetic of drawing and weighting (``eval_dtype``): ``"float64"`` (default) carries the
        base draws through a float64 copy of the trained network, so the weights are exact for the map applied
        to the last bits (a float32 flow rounds its shared diagonal the same way in every coordinate, a bias the
        standard error cannot show); ``None``: the network's dtype.
    """

    num_steps: int | None = None
    log_det: str = "exact"
    exact_log_det_max_dim: int | None = None
    num_probes: int = 16
    chunk_size: int = 2048
    dtype: str | None = "float64"
    diagnostic_draws: int = 16384

    def __post_init__(self):
        check_choice("eval_log_det", self.log_det, LOG_DET_METHODS)
        check_choice("eval_dtype", self.dtype, (None, "float32", "float64"))
        if self.num_steps is not None:
            check_positive_int("num_steps", self.num_steps)
        if self.exact_log_det_max_dim is not None:
            check_positive_int("exact_log_det_max_dim", self.exact_log_det_max_dim)
        for name, value in (("eval_num_probes", self.num_probes), ("chunk_size", self.chunk_size)):
            check_positive_int(name, value)
        check_positive_int("diagnostic_draws", self.diagnostic_draws, minimum=0)

    def torch_dtype(self, flow_dtype: torch.dtype) -> torch.dtype:
        """The dtype draws are made in, for a flow trained in ``flow_dtype``."""
        return flow_dtype if self.dtype is None else getattr(torch, self.dtype)

    def default_log_det(self, dim: int) -> str:
        """The volume method for a ``dim``-dimensional target when none is asked for."""
        if self.log_det == "exact" and self.exact_log_det_max_dim is not None and dim > self.exact_log_det_max_dim:
            return "hutchinson"
        return self.log_det


class TransportOutput(NamedTuple):
    r"""
    Points ``x`` (the potential's dtype), their log density ``log_q`` under the transport (NaN without a
    volume: ``log_det="none"`` or a map without a density), their ``orientation`` (``None`` unless the
    volume is exact), the ``log_det`` method actually used and, for a mixture, the ``component`` that drew
    each point.
    """

    x: torch.Tensor
    log_q: torch.Tensor
    orientation: torch.Tensor | None
    log_det: str
    component: torch.Tensor | None = None


class Transport(Protocol):
    """A map from base draws to the target space with its exact density (module docstring)."""

    dim: int

    def sample(self, num_samples: int, *, log_det: str = "exact",
               generator: torch.Generator | None = None) -> TransportOutput:
        """``num_samples`` fresh points with their log densities."""

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log_q, ok)`` at given points by the exact inverse; ``ok`` marks converged, unfolded rows."""


def draw(transport: Transport, potential_fn: PotentialFn, num_samples: int, *, log_det: str = "exact",
         chunk_size: int = 2048, generator: torch.Generator | None = None) -> Draws:
    r"""
    ``num_samples`` fresh draws of ``transport`` in chunks of ``chunk_size``, each with its potential
    :math:`U(x)` and exact log-weight :math:`\log w = -U(x) - \log q(x)` (float64). With
    ``log_det="none"`` the potential is not evaluated and ``potential``, ``log_q`` and ``log_weight``
    are NaN.
    """
    check_positive_int("num_samples", num_samples)
    chunks = []
    for start in range(0, num_samples, chunk_size):
        n = min(chunk_size, num_samples - start)
        out = transport.sample(n, log_det=log_det, generator=generator)
        if log_det == "none":
            u = torch.full((n,), math.nan, dtype=out.x.dtype, device=out.x.device)
        else:
            with torch.no_grad():
                u = potential_fn(out.x).detach()
        log_w = (-u.to(torch.float64)) - out.log_q.to(torch.float64)
        chunks.append(Draws(out.x, u, out.log_q, log_w, out.orientation, out.log_det, component=out.component))
    return Draws.cat(chunks)


class _PreconditionedTransport:
    """What every transport of a chain shares: a control network on the whitened potential, its step
    count, the base distribution (the reference process's prior in the flow's dtype), the affine map to
    the potential's space and the dtype bridge."""

    def __init__(self, net: torch.nn.Module, potential_z: PotentialFn, process: ReferenceProcess, affine: AffineMap,
                 num_steps: int, *, dtype: torch.dtype, model_dtype: torch.dtype, base_dtype: torch.dtype | None = None):
        process.step_codes(num_steps)  # validates num_steps
        self.net, self.potential_z, self.process, self.affine, self.num_steps = (net, potential_z, process, affine,
                                                                                 num_steps)
        self.dim = affine.shift.numel()
        self.dtype, self.model_dtype = dtype, model_dtype
        self.base_dtype = dtype if base_dtype is None else base_dtype
        self.device = affine.shift.device

    def sample_base(self, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""Base draws :math:`z_0 \sim p_0`, ``(num_samples, dim)``, never clipped, generated in ``base_dtype``
        (the training dtype: the same stream whatever the arithmetic) and carried in ``dtype``."""
        z0 = self.process.sample_prior(num_samples, self.dim, clip=False, dtype=self.base_dtype, device=self.device,
                                       generator=generator)
        return z0.to(self.dtype)

    def sample(self, num_samples: int, *, log_det: str = "exact",
               generator: torch.Generator | None = None) -> TransportOutput:
        """Base draws carried through the map (``self(z0)``)."""
        return self(self.sample_base(num_samples, generator=generator), log_det=log_det, generator=generator)

    def _to_flow_space(self, x: torch.Tensor) -> torch.Tensor:
        return self.affine.inverse(torch.as_tensor(x, device=self.device).to(self.dtype))

    def _nan(self, n: int) -> torch.Tensor:
        return torch.full((n,), math.nan, dtype=self.dtype, device=self.device)


def base_log_q(process: ReferenceProcess, z0: torch.Tensor, log_abs_det: torch.Tensor,
               precondition_log_abs_det: torch.Tensor) -> torch.Tensor:
    r"""
    :math:`\log q(x) = \log p_0(z_0) - \log|\det \partial F/\partial z_0| - \log|\det \partial T/\partial y|` in
    float64 for the map actually applied (its float32 base draws, flow :math:`F` and preconditioner :math:`T` at
    the flow's output :math:`y`, whose log-determinant per draw is ``precondition_log_abs_det``): a float32 sum of a
    few hundred nats would be off by ~1e-5 nats for every draw alike, a bias the weights' standard error cannot
    show.
    """
    z0 = z0.to(torch.float64)
    return process.prior_log_prob(z0) - log_abs_det.to(torch.float64) - precondition_log_abs_det.to(torch.float64)


def _precondition(affine, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The preconditioner at the flow's outputs ``y``: ``(x, log|det|)`` in float64, detached (the points and the
    volume of one map, whatever the flow's arithmetic)."""
    with torch.no_grad():
        return affine.to(torch.float64).forward_and_log_abs_det(y.detach().to(torch.float64))


class FlowTransport(_PreconditionedTransport):
    r"""
    ``num_steps`` probability-flow ODE steps of the control network ``net`` on the whitened potential
    ``potential_z``, then the ``affine`` map (module docstring); the flow runs in ``dtype``, the points
    are returned in the potential's ``model_dtype``. ``num_probes`` sets the probes of a
    ``"hutchinson"`` volume.
    """

    def __init__(self, *args, num_probes: int = 16, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_probes = num_probes

    def __call__(self, z0: torch.Tensor, *, log_det: str = "exact",
                 generator: torch.Generator | None = None) -> TransportOutput:
        out = flow(self.net, self.potential_z, self.process, z0, self.num_steps, log_det=log_det,
                   num_probes=self.num_probes, generator=generator)
        x, precondition_log_abs_det = _precondition(self.affine, out.x)
        if log_det == "none":
            log_q = self._nan(z0.shape[0])
        else:
            log_q = base_log_q(self.process, z0, out.log_abs_det, precondition_log_abs_det)
        return TransportOutput(x.to(self.model_dtype), log_q.detach(), out.orientation, log_det)

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Log density at points ``x`` by the exact inverse flow
        (:func:`~pyro_osds.ops.inverse.inverse_flow`); ``ok`` marks points whose inversion converged
        with the majority orientation."""
        y = self._to_flow_space(x)
        inv = inverse_flow(self.net, self.potential_z, self.process, y, self.num_steps)
        log_q = base_log_q(self.process, inv.x0, inv.log_abs_det, _precondition(self.affine, y)[1])
        return log_q.detach(), inv.converged & ~count_folded(inv.orientation)


class ConsistencyTransport(_PreconditionedTransport):
    r"""
    CDDS's consistency function :math:`x = f_\theta(z_0, T)` then the affine map. Its volume is always
    the exact one (any ``log_det`` but ``"none"`` gives it). With ``num_steps > 1`` the draws alternate
    :math:`f_\theta` with re-noising (:func:`~pyro_osds.ops.consistency.noise_to`): no density, so
    ``log_q`` is NaN and :meth:`log_prob` raises.
    """

    def __init__(self, *args, sigma_data: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_data = sigma_data

    def __call__(self, z0: torch.Tensor, *, log_det: str = "exact",
                 generator: torch.Generator | None = None) -> TransportOutput:
        T = self.process.grid_size
        with_volume = self.num_steps == 1 and log_det != "none"
        sign = None
        if with_volume:
            out = consistency_function(self.net, self.potential_z, self.process, z0, float(T),
                                       sigma_data=self.sigma_data, with_volume=True)
            z, sign = out.f, out.sign
            x, precondition_log_abs_det = _precondition(self.affine, z)
            log_q = base_log_q(self.process, z0, out.log_abs_det, precondition_log_abs_det)
        else:
            z = z0
            codes = [T * (self.num_steps - k) / self.num_steps for k in range(self.num_steps)]
            for k, code in enumerate(codes):
                if k > 0:
                    z = noise_to(self.process, z, code, generator=generator)
                z = consistency_function(self.net, self.potential_z, self.process, z, code,
                                         sigma_data=self.sigma_data).f
            x, log_q = _precondition(self.affine, z)[0], self._nan(z0.shape[0])
        return TransportOutput(x.to(self.model_dtype), log_q.detach(), sign, "exact" if with_volume else "none")

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Log density at points ``x`` by the exact (Newton) inverse of the one-step map
        (:func:`~pyro_osds.ops.consistency.invert_consistency`)."""
        if self.num_steps != 1:
            raise ValueError(
                "CDDS draws with num_steps > 1 re-noise between steps, so they have no tractable density; "
                "use the one-step map (num_steps=1), whose density is exact."
            )
        T = float(self.process.grid_size)
        y = self._to_flow_space(x)
        z0, converged = invert_consistency(self.net, self.potential_z, self.process, y, T,
                                           sigma_data=self.sigma_data)
        out = consistency_function(self.net, self.potential_z, self.process, z0, T, sigma_data=self.sigma_data,
                                   with_volume=True)
        log_q = base_log_q(self.process, z0, out.log_abs_det, _precondition(self.affine, y)[1])
        return log_q.detach(), converged & ~count_folded(out.sign)


class MixtureTransport:
    r"""
    Draws from the mixture :math:`q = \sum_k \alpha_k q_k` of ``components`` (transports on the same space)
    with ``weights`` :math:`\alpha` (normalised here): each draw comes from one component, chosen with
    probability :math:`\alpha_k`, and is weighted by multiple importance sampling (Veach and Guibas
    1995), which gives an unbiased :math:`\hat Z` and exact weights whatever :math:`\alpha` is:

    * without ``partition``, against the whole mixture (the balance heuristic),
      :math:`\log q(x) = \log\sum_j \alpha_j q_j(x)`, with the drawing component's density from its forward
      map and the others' from their exact inverses (:meth:`Transport.log_prob`); a point where another
      component's inversion does not converge counts as outside its reach (:math:`q_j(x) = 0`);
    * with a ``partition`` of unity :math:`s_j(x)` (a callable returning :math:`\log s_j(x)`, ``(M, N)``,
      e.g. :class:`~pyro_osds.ops.mode_search.LaplacePartition`), a draw of component :math:`k` counts
      for the piece :math:`\pi s_k` only: its effective density is
      :math:`\log\tilde q(x) = \log\alpha_k + \log q_k(x) - \log s_k(x)`, so
      :math:`\mathbb E[\pi/\tilde q] = \sum_k \int \pi s_k = Z`, and no other component's density is needed.

    ``orientation`` is the drawing component's; ``component`` records it.
    """

    def __init__(self, components, weights, *, partition=None):
        self.components = list(components)
        weights = tensor_on_its_device(weights, dtype=torch.float64).reshape(-1)
        if len(self.components) != weights.numel() or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError(f"`weights` must be {len(self.components)} non-negative numbers, not all zero, got "
                             f"{weights.tolist()}.")
        self.weights = weights / weights.sum()
        self.partition = partition
        self.dim = self.components[0].dim

    def _log_prob_under(self, k: int, x: torch.Tensor) -> torch.Tensor:
        log_q, ok = self.components[k].log_prob(x)
        log_q = log_q.to(torch.float64)
        return torch.where(ok, log_q, torch.full_like(log_q, -math.inf))

    def sample(self, num_samples: int, *, log_det: str = "exact",
               generator: torch.Generator | None = None) -> TransportOutput:
        """``num_samples`` draws in random order, each from a component drawn with probability
        :math:`\alpha_k` (class docstring)."""
        out = self._sample_grouped(num_samples, log_det=log_det, generator=generator)
        stream = self.weights.device if generator is None else generator.device  # the stream's device
        order = torch.randperm(num_samples, generator=generator, device=stream).to(out.x.device)
        return TransportOutput(out.x[order], out.log_q[order.to(out.log_q.device)],
                               None if out.orientation is None else out.orientation[order], out.log_det,
                               out.component[order.cpu()])

    def _sample_grouped(self, num_samples: int, *, log_det: str,
                        generator: torch.Generator | None) -> TransportOutput:
        stream = self.weights.device if generator is None else generator.device
        which = torch.multinomial(self.weights.to(stream), num_samples, replacement=True, generator=generator)
        counts = torch.bincount(which, minlength=len(self.components)).tolist()
        outs = [(k, c.sample(n, log_det=log_det, generator=generator))
                for k, (c, n) in enumerate(zip(self.components, counts, strict=True)) if n > 0]
        x = torch.cat([out.x for _, out in outs])
        component = torch.cat([torch.full((out.x.shape[0],), k, dtype=torch.long, device="cpu") for k, out in outs])
        signs = [out.orientation for _, out in outs]
        orientation = None if any(s is None for s in signs) else torch.cat(signs)
        if any(out.log_det == "none" for _, out in outs):
            nan = torch.full((num_samples,), math.nan, dtype=torch.float64, device=x.device)
            return TransportOutput(x, nan, orientation, "none", component)
        own = torch.cat([out.log_q.to(torch.float64) for _, out in outs])
        mine = component.to(x.device)
        if self.partition is not None:
            log_s = self.partition(x).to(torch.float64)
            rows = torch.arange(num_samples, device=log_s.device)
            log_q = self.weights.log().to(own.device)[mine] + own - log_s[mine.to(log_s.device), rows].to(own.device)
            return TransportOutput(x, log_q, orientation, outs[0][1].log_det, component)
        terms = torch.empty(len(self.components), num_samples, dtype=torch.float64, device="cpu")
        for j in range(len(self.components)):
            log_qj = own.clone()
            others = mine != j
            if bool(others.any()):  # every other component's draws through component j's inverse
                log_qj[others] = self._log_prob_under(j, x[others]).to(own.device)
            terms[j] = self.weights[j].log() + log_qj.cpu()
        log_q = torch.logsumexp(terms, 0).to(own.device)
        return TransportOutput(x, log_q, orientation, outs[0][1].log_det, component)

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture's log density :math:`\\log\\sum_k \\alpha_k q_k(x)` at ``x`` (every component's exact
        inverse); ``ok`` marks points some component reaches."""
        terms = torch.stack([self.weights[k].log() + self._log_prob_under(k, x) for k in range(len(self.components))])
        log_q = torch.logsumexp(terms, 0)
        return log_q, torch.isfinite(log_q)
