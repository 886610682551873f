# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The tail-adaptive affine preconditioner: an element-wise monotone map that gives each whitened coordinate
its own left and right tail, then the affine map,

.. math::

    x = m + L\,g(y), \qquad g_i(y_i) = \delta_i\,\sinh\!\big(\operatorname{asinh}(y_i)/\delta_i\big), \qquad
    \delta_i = \begin{cases} \delta^-_i & y_i < 0 \\ \delta^+_i & y_i \ge 0, \end{cases}

a two-sided sinh-arcsinh transform [1]. Each side is odd with :math:`g(y) = y + (\delta^{-2} - 1)\,y^3/6 + O(y^5)`,
so :math:`g` is twice continuously differentiable at 0 whatever the two tails, equals the identity at
:math:`\delta^\pm = 1` and keeps the affine fit's meaning (location and scale at the bulk). A tail with
:math:`\delta < 1` is heavier than Gaussian (:math:`g(y) \sim (2y)^{1/\delta}\delta/2`: a standard normal :math:`y`
gives :math:`P(x > t) \approx e^{-(2t/\delta)^{2\delta}/8}`, exponential at :math:`\delta = 1/2`), :math:`\delta > 1`
lighter. Two tails rather than one skew parameter: a positive parameter on the log scale (a Gamma posterior's
:math:`\log\lambda`) has an exponential left tail and a doubly exponential right one; on the 1-D log-Gamma
posterior of shape 2 the Gaussian's KL is 0.042 nats, one sinh-arcsinh with a skew (Jones & Pewsey's) 0.0024,
the two tails 0.00044.

The map is closed-form both ways, :math:`g^{-1}(x) = \sinh(\delta\operatorname{asinh}(x/\delta))` with the side
chosen by the sign of :math:`x` (:math:`g` keeps signs), and its log-determinant is exact:

.. math:: \log\Big|\det\frac{\partial x}{\partial y}\Big| = \log|\det L| + \sum_i \Big[\log\cosh\big(
    \operatorname{asinh}(y_i)/\delta_i\big) - \tfrac12\log(1 + y_i^2)\Big].

:func:`~pyro_osds.ops.precondition.fit_tails` fits the tails after the Gaussian (``precondition_tails=True``), by
the same ELBO; the flow is then trained on the potential pulled back through the whole map. The tails are bounded,
:math:`\delta \in [1/5, 5]`, smoothly (:func:`tail_from_parameter`).

**References**

[1] `Sinh-arcsinh distributions`, M. C. Jones, A. Pewsey (2009), Biometrika 96(4).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["MAX_TAIL", "TailAffineMap", "tail_from_parameter", "tail_inverse", "tail_transform"]

#: the bound on the tails' :math:`\delta` and its reciprocal (:func:`tail_from_parameter`)
MAX_TAIL = 5.0


def tail_from_parameter(theta: torch.Tensor) -> torch.Tensor:
    r""":math:`\delta = \exp\big(c\tanh(\theta/c)\big)` with :math:`c = \log` :data:`MAX_TAIL`: a smooth bijection
    from :math:`\mathbb R` onto :math:`(1/5, 5)`, the identity tail :math:`\delta = 1` at :math:`\theta = 0` with
    unit slope in :math:`\log\delta` there."""
    c = math.log(MAX_TAIL)
    return torch.exp(c * torch.tanh(theta / c))


def _sides(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.where(y < 0, left, right)


def tail_transform(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`g(y)` and :math:`\log g'(y)` element-wise (module docstring) for ``y`` ``(batch, D)`` and the tails
    ``left``, ``right`` ``(D,)``."""
    delta = _sides(y, left, right)
    w = torch.asinh(y) / delta
    # log cosh w = |w| + log1p(exp(-2|w|)) - log 2, finite for any w
    log_cosh = w.abs() + torch.nn.functional.softplus(-2.0 * w.abs()) - math.log(2.0)
    return delta * torch.sinh(w), log_cosh - 0.5 * torch.log1p(y * y)


def tail_inverse(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    r""":math:`g^{-1}(x) = \sinh(\delta\operatorname{asinh}(x/\delta))` element-wise (the side of :math:`x`'s sign)."""
    delta = _sides(x, left, right)
    return torch.sinh(delta * torch.asinh(x / delta))


class TailAffineMap(NamedTuple):
    r""":math:`x = m + L\,g(y)` (module docstring): ``shift`` :math:`m` ``(D,)``, lower-triangular ``scale_tril``
    :math:`L` ``(D, D)``, the tails ``left`` :math:`\delta^-` and ``right`` :math:`\delta^+` ``(D,)``."""

    shift: torch.Tensor
    scale_tril: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward_and_log_abs_det(y)[0]

    def forward_and_log_abs_det(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(x, log|det dx/dy|)`` for ``y`` ``(batch, D)``, the log-determinant ``(batch,)``."""
        g, log_slope = tail_transform(y, self.left, self.right)
        x = self.shift + g @ self.scale_tril.T
        return x, log_slope.sum(-1) + self.scale_tril.diagonal().abs().log().sum()

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.solve_triangular(self.scale_tril, (x - self.shift).T, upper=False).T
        return tail_inverse(g, self.left, self.right)

    def state(self) -> dict:
        """The map's tensors by name (for checkpoints), with ``kind``."""
        return {"kind": "tail_affine", **{k: v.detach().clone() for k, v in self._asdict().items()}}

    def to(self, dtype=None, device=None) -> TailAffineMap:
        return TailAffineMap(*(t.to(dtype=dtype, device=device) for t in self))
