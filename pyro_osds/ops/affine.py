# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Affine maps :math:`x = m + Lz` and what every preconditioner shares: the whitened potential

.. math:: U_z(z) = U(m + L z) - \log|\det L|,

whose normaliser equals that of :math:`U` (a sampler density :math:`q_z` in :math:`z` maps to
:math:`\log q_x(x) = \log q_z(z) - \log|\det L|`, so importance weights stay exact), the scale of a Laplace fit
and the Gaussian covering several of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..util import PotentialFn
from .marginal import MarginalMixtureMap
from .tails import TailAffineMap

__all__ = ["AffineMap", "covering_gaussian", "preconditioner_from_state", "scale_from_hessian", "whiten_potential"]


class AffineMap(NamedTuple):
    r""":math:`x = m + L z` with ``shift`` :math:`m` ``(D,)`` and lower-triangular ``scale_tril`` :math:`L` ``(D, D)``."""

    shift: torch.Tensor
    scale_tril: torch.Tensor

    @classmethod
    def identity(cls, dim: int, *, scale: float = 1.0, shift: torch.Tensor | None = None, dtype=None, device=None):
        m = torch.zeros(dim, dtype=dtype, device=device) if shift is None else shift.detach().clone()
        return cls(m, scale * torch.eye(dim, dtype=m.dtype, device=m.device))

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.shift + z @ self.scale_tril.T

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        sol = torch.linalg.solve_triangular(self.scale_tril, (x - self.shift).T, upper=False)
        return sol.T

    @property
    def log_abs_det(self) -> torch.Tensor:
        r""":math:`\log|\det L|`."""
        return self.scale_tril.diagonal().abs().log().sum()

    def forward_and_log_abs_det(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(x, log|det dx/dz|)`` for ``z`` ``(batch, D)``, the log-determinant ``(batch,)`` (the interface every
        preconditioner offers; :class:`~pyro_osds.ops.marginal.MarginalMixtureMap`'s varies with ``z``)."""
        return self(z), self.log_abs_det.expand(z.shape[:-1])

    def state(self) -> dict:
        """The map's tensors by name (for checkpoints)."""
        return {"shift": self.shift.detach().clone(), "scale_tril": self.scale_tril.detach().clone()}

    def to(self, dtype=None, device=None) -> AffineMap:
        return AffineMap(self.shift.to(dtype=dtype, device=device), self.scale_tril.to(dtype=dtype, device=device))


def whiten_potential(potential_fn: PotentialFn, affine) -> PotentialFn:
    r"""The whitened potential :math:`U_z(z) = U(T(z)) - \log|\det \partial T/\partial z|` (batched) of a
    preconditioner :math:`T`: :math:`U(m + Lz) - \log|\det L|` for an :class:`AffineMap`, and the same pull-back
    for a :class:`~pyro_osds.ops.marginal.MarginalMixtureMap`."""

    def whitened(z: torch.Tensor) -> torch.Tensor:
        x, log_abs_det = affine.forward_and_log_abs_det(z)
        return potential_fn(x) - log_abs_det

    return whitened


def preconditioner_from_state(state: dict, dtype=None, device=None):
    """The preconditioner a checkpoint holds (:meth:`AffineMap.state`, :meth:`MarginalMixtureMap.state`,
    :meth:`~pyro_osds.ops.tails.TailAffineMap.state`)."""
    if state.get("kind") == "marginal_mixture":
        fields = {k: v for k, v in state.items() if k != "kind"}
        return MarginalMixtureMap(**fields).to(dtype=dtype, device=device)
    if state.get("kind") == "tail_affine":
        return TailAffineMap(*(state[k] for k in TailAffineMap._fields)).to(dtype=dtype, device=device)
    return AffineMap(state["shift"], state["scale_tril"]).to(dtype=dtype, device=device)


def scale_from_hessian(hessian: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """The lower-triangular scale :math:`L` of the Laplace covariance :math:`H^{-1}` (eigenvalues by magnitude,
    floored at :math:`10^{-8}` of the largest), or its marginal scales ``diag(|H_ii|^{-1/2})`` (``diagonal``)."""
    h = 0.5 * (hessian + hessian.T)
    if diagonal:
        d = h.diagonal()
        floor = 1e-8 * d.abs().max().clamp_min(1e-12)
        return torch.diag(d.abs().clamp_min(floor).rsqrt())
    eigval, eigvec = torch.linalg.eigh(h)
    floor = 1e-8 * eigval.abs().max().clamp_min(1e-12)
    inv = eigval.abs().clamp_min(floor).reciprocal()
    cov = (eigvec * inv) @ eigvec.T
    cov = 0.5 * (cov + cov.T)
    return torch.linalg.cholesky(cov)


def covering_gaussian(modes: list[tuple[AffineMap, float]]) -> AffineMap:
    r"""
    The Gaussian with the mean and covariance of the mixture :math:`\sum_k \pi_k \mathcal N(m_k, L_k L_k^\top)`:
    :math:`\bar m = \sum_k \pi_k m_k`, :math:`\Sigma = \sum_k \pi_k (L_kL_k^\top + m_k m_k^\top) - \bar m\bar m^\top`.
    """
    mean = sum(w * a.shift for a, w in modes)
    second = sum(w * (a.scale_tril @ a.scale_tril.T + torch.outer(a.shift, a.shift)) for a, w in modes)
    cov = second - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    return AffineMap(mean, scale_from_hessian(torch.linalg.inv(cov), diagonal=False))
