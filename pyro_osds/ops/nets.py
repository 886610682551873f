# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The step-conditioned control network :math:`u_\theta(x, t, d, g)`.

.. math::

    u_\theta(x, t, d, g) = h_\theta\big(x, a(e)\big) + b_\theta(e) \odot \operatorname{clip}(g, \pm c_{\rm in}),
    \qquad e = \big[\phi(t), \phi(d)\big],

where :math:`\phi` are Fourier features :math:`\sin(\kappa s + \varphi), \cos(\kappa s + \varphi)`
with fixed frequencies :math:`\kappa` and a learnable phase :math:`\varphi` shared by :math:`t`
(normalised time :math:`c/T`) and :math:`d` (normalised step size), :math:`a` is the state branch's
time code, :math:`b` the Langevin branch and :math:`g` the Langevin input (the :math:`\sigma`-scaled
score of the geometric prior/target interpolation, see :mod:`pyro_osds.ops.integrate`). The last layer
of :math:`b` starts at bias 1 and that of :math:`h` at bias 0 with tiny weights, so that
:math:`u \approx g` at initialisation (a Langevin-like drift).

Any network the integrators can use derives from :class:`ControlNetwork`, which states the
interface: the control itself, optional precomputed step features, and optionally a closed-form
Jacobian (:attr:`ControlNetwork.closed_form_jacobian`).

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, P. Jutras-Dubé, J. Zhang,
    Z. Wang, R. Zhang (2025), arXiv 2512.05251 (the ``PISGRADStep`` network of its code).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..util import check_choice, check_number, check_positive_int, derive_seed
from .lowrank import DiagPlusLowRank

#: held while a network initialises from the global RNG under a fixed seed (chains may build in threads)
_GLOBAL_RNG_LOCK = threading.Lock()

__all__ = ["ACTIVATIONS", "ControlNetwork", "FourierFeatures", "NetConfig", "StepConditionedControl"]


class ControlNetwork(nn.Module):
    r"""
    Interface of a control network :math:`u_\theta(x, t, d, g)` for :mod:`pyro_osds.ops.integrate`:

    * ``forward(x, t, d, g, *, features=None)``: the control ``(batch, dim)`` for states ``x``,
      normalised time ``t = c/T`` and step ``d`` (numbers or ``(batch,)``) and Langevin input ``g``;
    * :meth:`step_features`: parameter-dependent codes of ``(t, d)`` pairs that ``forward`` accepts
      as ``features`` (a rollout precomputes them for all its steps); ``None`` when there are none;
    * :meth:`control_and_jacobian`, when :attr:`closed_form_jacobian` is true: the control and its
      exact Jacobian without ``dim`` backward passes; otherwise the integrators use autograd;
    * :meth:`control_and_jacobian_factors`, when :attr:`jacobian_rank` is set: the same Jacobian, for a
      diagonal Jacobian of the Langevin input, as a diagonal plus a product of that rank
      (:class:`~pyro_osds.ops.lowrank.DiagPlusLowRank`);
    * :meth:`pass_counter`: the sub-module every pass of a batch goes through once, whichever method makes it
      (what :class:`~pyro_osds.cost.CostMeter` counts passes on).
    """

    #: whether :meth:`control_and_jacobian` is implemented
    closed_form_jacobian: bool = False
    #: the rank of a low-rank part of the Jacobian (:meth:`control_and_jacobian_factors`), ``None`` if none
    jacobian_rank: int | None = None

    def step_features(self, t: torch.Tensor, d: torch.Tensor):
        """Precomputable codes of ``n`` (time, step) pairs, or ``None`` (default: none)."""
        return None

    def pass_counter(self) -> nn.Module:
        """The sub-module every pass of a batch of states goes through exactly once (default: the network)."""
        return self

    def control_and_jacobian(self, x, t, d, g, g_jacobian, *, transposed: bool = False):
        raise NotImplementedError(f"{type(self).__name__} has no closed-form Jacobian.")

    def control_and_jacobian_factors(self, x, t, d, g, g_jacobian):
        raise NotImplementedError(f"{type(self).__name__} has no diagonal-plus-low-rank Jacobian.")


class FourierFeatures(nn.Module):
    r"""
    :math:`s \mapsto [\sin(\kappa s + \varphi), \cos(\kappa s + \varphi)]` with
    ``num_frequencies`` frequencies :math:`\kappa` evenly spaced in ``[0.1, max_frequency]`` and a
    learnable phase :math:`\varphi` (zero at initialisation).
    """

    def __init__(self, num_frequencies: int = 64, max_frequency: float = 100.0, *, dtype=None, device=None):
        super().__init__()
        self.register_buffer(
            "frequencies", torch.linspace(0.1, max_frequency, num_frequencies, dtype=dtype, device=device)
        )
        self.phase = nn.Parameter(torch.zeros(num_frequencies, dtype=dtype, device=device))

    @property
    def out_features(self) -> int:
        return 2 * self.frequencies.numel()

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        arg = s.unsqueeze(-1) * self.frequencies + self.phase
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}


def _silu_derivative(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _gelu_derivative(z):
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _gelu_tanh_derivative(z):
    c = math.sqrt(2.0 / math.pi)
    inner = c * (z + 0.044715 * z**3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * z * z)


#: derivative of each activation, for the closed-form Jacobian of the state network
ACTIVATION_DERIVATIVES = {"gelu": _gelu_derivative, "gelu_tanh": _gelu_tanh_derivative, "silu": _silu_derivative}


def _mlp(in_features: int, hidden: int, num_hidden_layers: int, out_features: int, activation, *, dtype,
         device) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_features, hidden, dtype=dtype, device=device)]
    for _ in range(num_hidden_layers):
        layers += [activation(), nn.Linear(hidden, hidden, dtype=dtype, device=device)]
    layers += [activation(), nn.Linear(hidden, out_features, dtype=dtype, device=device)]
    return nn.Sequential(*layers)


class StepConditionedControl(ControlNetwork):
    r"""
    The control network :math:`u_\theta(x, t, d, g)` (module docstring).

    :param int dim: state dimension :math:`D`.
    :param int hidden_dim: width of every hidden layer (64).
    :param int num_layers: hidden layers of the state network :math:`h` (2); the Langevin branch
        has ``num_layers`` hidden layers too.
    :param int num_frequencies: Fourier frequencies per scalar input (64, i.e. 128 features).
    :param float max_frequency: largest Fourier frequency (100).
    :param float inner_clip: :math:`c_{\rm in}`, clip of the Langevin input (100).
    :param float outer_clip: clip of :math:`h` (1e4).
    :param float init_weight: constant initial weight of both output layers (1e-8).
    :param float langevin_bias: initial bias of the Langevin branch's output (1.0).
    :param str activation: ``"gelu"`` (the paper's), ``"gelu_tanh"`` or ``"silu"`` (3x cheaper
        than exact GELU on CPU).
    """

    closed_form_jacobian = True

    def __init__(
        self,
        dim: int,
        *,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_frequencies: int = 64,
        max_frequency: float = 100.0,
        inner_clip: float = 100.0,
        outer_clip: float = 1e4,
        init_weight: float = 1e-8,
        langevin_bias: float = 1.0,
        activation: str = "gelu",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
            check_positive_int(name, value)
        check_choice("activation", activation, ACTIVATIONS)
        act = ACTIVATIONS[activation]
        self.activation = activation
        self.dim = dim
        self.inner_clip = float(inner_clip)
        self.outer_clip = float(outer_clip)
        kw = dict(dtype=dtype, device=device)
        self.features = FourierFeatures(num_frequencies, max_frequency, **kw)
        emb = 2 * self.features.out_features
        # branch A: time/step code for the state network
        self.time_code = nn.Sequential(nn.Linear(emb, hidden_dim, **kw), act(), nn.Linear(hidden_dim, hidden_dim, **kw))
        # branch B: per-coordinate gain of the Langevin input
        self.langevin_gain = _mlp(emb, hidden_dim, num_layers, dim, act, **kw)
        # state network h(x, a)
        layers: list[nn.Module] = []
        width = dim + hidden_dim
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim, **kw), act()]
            width = hidden_dim
        layers.append(nn.Linear(width, dim, **kw))
        self.state_net = nn.Sequential(*layers)
        with torch.no_grad():
            for out_layer, bias in ((self.langevin_gain[-1], langevin_bias), (self.state_net[-1], 0.0)):
                out_layer.weight.fill_(init_weight)
                out_layer.bias.fill_(bias)

    def embed(self, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Fourier embedding of (time, step size), broadcast to a common batch shape."""
        t, d = torch.broadcast_tensors(t, d)
        return torch.cat([self.features(t), self.features(d)], dim=-1)

    def step_features(self, t: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parameter-dependent codes of ``n`` (time, step) pairs: ``(a(e) (n, hidden), b(e) (n, dim))``.
        Precomputing them for all steps of a rollout saves two MLP calls per step."""
        e = self.embed(t, d)
        return self.time_code(e), self.langevin_gain(e)

    def forward(self, x: torch.Tensor, t, d, g: torch.Tensor, *, features=None) -> torch.Tensor:
        """
        :param torch.Tensor x: states ``(batch, dim)``.
        :param t: normalised time ``c / T``, a number or a ``(batch,)`` tensor.
        :param d: normalised step size ``d / T``, a number or a ``(batch,)`` tensor.
        :param torch.Tensor g: Langevin input ``(batch, dim)``.
        :param features: optional precomputed :meth:`step_features` for this ``(t, d)``, each with
            one row (shared) or ``batch`` rows; ``t`` and ``d`` are then ignored.
        :returns: the control ``(batch, dim)``.
        """
        batch = x.shape[0]
        if features is None:
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            d = torch.as_tensor(d, dtype=x.dtype, device=x.device)
            if t.dim() == 0 and d.dim() == 0:
                # shared time and step: embed once, broadcast over the batch
                features = self.step_features(t.reshape(1), d.reshape(1))
            else:
                features = self.step_features(t.expand(batch), d.expand(batch))
        code, gain = features
        h = self.state_net(torch.cat([x, code.expand(batch, -1)], dim=-1)).clamp(-self.outer_clip, self.outer_clip)
        return h + gain * g.clamp(-self.inner_clip, self.inner_clip)

    def _features_for(self, x: torch.Tensor, t, d) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_features` of ``(t, d)`` for the batch ``x`` (one row when both are shared)."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        d = torch.as_tensor(d, dtype=x.dtype, device=x.device)
        if t.dim() == 0 and d.dim() == 0:
            return self.step_features(t.reshape(1), d.reshape(1))
        return self.step_features(t.expand(x.shape[0]), d.expand(x.shape[0]))

    def pass_counter(self) -> nn.Module:
        """The state network's output layer: :meth:`forward` and both closed-form Jacobians apply it once."""
        return self.state_net[-1]

    @property
    def jacobian_rank(self) -> int:
        r"""The largest rank of the state network's Jacobian :math:`\partial h/\partial x`: its width."""
        return self.state_net[-1].in_features

    def control_and_jacobian_factors(
        self, x: torch.Tensor, t, d, g: torch.Tensor, g_jacobian: torch.Tensor
    ) -> tuple[torch.Tensor, DiagPlusLowRank]:
        r"""
        The control and its exact Jacobian as a diagonal plus a product of rank :attr:`jacobian_rank`,
        for a Langevin input whose Jacobian ``g_jacobian`` is diagonal (``(batch, dim)``, or ``(1, dim)`` when
        the same for every draw):

        .. math::

            \frac{\partial u}{\partial x} = \operatorname{diag}\big(b \odot 1[|g| < c_{\rm in}] \odot g'\big)
              + \underbrace{\big(1[|h| < c_{\rm out}] \odot W_L\big)}_{L\ (D \times r)}
                \underbrace{D_{L-1} W_{L-1} \cdots W_2 D_1}_{C\ (r \times r)}
                \underbrace{W_1^{(x)}}_{R\ (r \times D)}

        (:class:`~pyro_osds.ops.lowrank.DiagPlusLowRank`): only the core :math:`C` depends on the draw, unless a
        clip is active (then the diagonal or :math:`L` does too), so the determinant and solves cost
        :math:`O(r^3 + D r)` per draw (:mod:`~pyro_osds.ops.lowrank`) where :meth:`control_and_jacobian` forms the
        :math:`D \times D` matrix. Differentiable.
        """
        batch = x.shape[0]
        code, gain = self._features_for(x, t, d)
        derivative = ACTIVATION_DERIVATIVES[self.activation]
        z = torch.cat([x, code.expand(batch, -1)], dim=-1)
        layers = list(self.state_net)
        right = layers[0].weight[:, : self.dim]  # W_1^(x), shared
        core = None  # D_l W_l ... W_2 D_1, (batch, r, r); a vector while it is the diagonal D_1
        for layer in layers[:-1]:
            if isinstance(layer, nn.Linear):
                if core is not None:
                    core = layer.weight * core.unsqueeze(-2) if core.dim() == 2 else torch.matmul(layer.weight, core)
            else:
                slope = derivative(z)
                core = slope if core is None else slope.unsqueeze(-1) * core
            z = layer(z)
        if core.dim() == 2:  # a single hidden layer: the core is D_1
            core = torch.diag_embed(core)
        z = layers[-1](z)
        inside = z.abs() < self.outer_clip
        h = z.clamp(-self.outer_clip, self.outer_clip)
        left = layers[-1].weight  # (dim, r), shared unless a clipped output zeroes its row
        if not bool(inside.all()):
            left = inside.to(z.dtype).unsqueeze(-1) * left
        g_inside = g.abs() < self.inner_clip
        u = h + gain * g.clamp(-self.inner_clip, self.inner_clip)
        diag = gain * g_jacobian
        if not bool(g_inside.all()):
            diag = diag * g_inside.to(g.dtype)
        return u, DiagPlusLowRank(diag, left, core, right)

    def control_and_jacobian(
        self, x: torch.Tensor, t, d, g: torch.Tensor, g_jacobian: torch.Tensor, *, transposed: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The control and its exact Jacobian with respect to ``x``, in closed form:

        .. math::

            \frac{\partial u}{\partial x} = \frac{\partial h}{\partial x}
              + \operatorname{diag}\big(b \odot 1[|g| < c_{\rm in}]\big)\,\frac{\partial g}{\partial x},
            \qquad
            \frac{\partial h}{\partial x} = 1[|h| < c_{\rm out}] \odot W_L\, D_{L-1} W_{L-1} \cdots D_1 W_1^{(x)},

        with :math:`D_\ell` the diagonal of activation derivatives. Batched matrix products replace
        the ``dim`` backward passes of automatic differentiation, and the result stays
        differentiable (for losses on the log-determinant).

        :param g_jacobian: :math:`\partial g/\partial x`, either ``(batch, dim)`` (a diagonal) or
            ``(batch, dim, dim)``.
        :param bool transposed: return :math:`(\partial u/\partial x)^\top` instead (cheaper: it is the
            layout the products are formed in; enough for determinants).
        :returns: ``(u, du_dx)`` of shapes ``(batch, dim)`` and ``(batch, dim, dim)``.
        """
        batch = x.shape[0]
        code, gain = self._features_for(x, t, d)
        derivative = ACTIVATION_DERIVATIVES[self.activation]
        z = torch.cat([x, code.expand(batch, -1)], dim=-1)
        # the transposed Jacobian dz/dx^T, kept as (batch, dim, width) so that every layer is one GEMM
        jac_t = None
        for layer in self.state_net:
            if isinstance(layer, nn.Linear):
                if jac_t is None:
                    jac_t = layer.weight[:, : self.dim].T.expand(batch, -1, -1)
                else:
                    width = jac_t.shape[-1]
                    jac_t = (jac_t.reshape(batch * self.dim, width) @ layer.weight.T).reshape(batch, self.dim, -1)
                z = layer(z)
            else:
                jac_t = derivative(z).unsqueeze(-2) * jac_t
                z = layer(z)
        inside = (z.abs() < self.outer_clip).to(z.dtype)
        h = z.clamp(-self.outer_clip, self.outer_clip)
        # row i of dh/dx is zero where h_i is clipped; on the CPU, where reading a tensor costs nothing, the product
        # is skipped when nothing is (multiplying by one is exact either way)
        if z.device.type != "cpu" or not bool(inside.all()):
            jac_t = jac_t * inside.unsqueeze(-2)
        g_inside = (g.abs() < self.inner_clip).to(g.dtype)
        u = h + gain * g.clamp(-self.inner_clip, self.inner_clip)
        scale = gain * g_inside
        if g_jacobian.dim() == 2:  # diagonal dg/dx: add diag(scale * dg/dx) in place
            jac_t.diagonal(dim1=-2, dim2=-1).add_(scale * g_jacobian)
        else:  # (diag(scale) G)^T = G^T diag(scale)
            jac_t = jac_t + g_jacobian.transpose(-1, -2) * scale.unsqueeze(-2)
        return u, (jac_t if transposed else jac_t.transpose(-1, -2))


@dataclass(frozen=True)
class NetConfig:
    r"""
    Hyper-parameters of the control network (:class:`StepConditionedControl`), validated once.

    :param int hidden_dim: width of every hidden layer (64).
    :param int num_layers: hidden layers of the state network and of the Langevin branch (2).
    :param int num_frequencies: Fourier frequencies per scalar input (64).
    :param float max_frequency: largest Fourier frequency (100).
    :param float inner_clip: clip of the Langevin input (100).
    :param float outer_clip: clip of the state network's output (1e4).
    :param str activation: ``"silu"`` (default), ``"gelu"`` (the paper's; 3x slower on CPU) or
        ``"gelu_tanh"``.
    :param dtype: dtype of the network and the flow: ``"float32"`` (default, 2-3x faster than float64
        on CPU), ``"float64"`` or ``None`` (the model's). The potential is always evaluated in the
        model's own dtype.
    """

    hidden_dim: int = 64
    num_layers: int = 2
    num_frequencies: int = 64
    max_frequency: float = 100.0
    inner_clip: float = 100.0
    outer_clip: float = 1e4
    activation: str = "silu"
    dtype: str | None = "float32"

    def __post_init__(self):
        for name in ("hidden_dim", "num_layers", "num_frequencies"):
            check_positive_int(name, getattr(self, name))
        for name in ("max_frequency", "inner_clip", "outer_clip"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("dtype", self.dtype, (None, "float32", "float64"))

    def torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The network's dtype for a model whose potential is evaluated in ``model_dtype``."""
        return model_dtype if self.dtype is None else getattr(torch, self.dtype)

    def build(self, dim: int, *, dtype=None, device=None,
              generator: torch.Generator | None = None) -> StepConditionedControl:
        """The network for states of dimension ``dim``; its initial weights come from ``generator``
        (when given) without touching the global RNG, so a chain's network depends on its seed only."""
        def build():
            return StepConditionedControl(
                dim, hidden_dim=self.hidden_dim, num_layers=self.num_layers, num_frequencies=self.num_frequencies,
                max_frequency=self.max_frequency, inner_clip=self.inner_clip, outer_clip=self.outer_clip,
                activation=self.activation, dtype=dtype, device=device,
            )

        if generator is None:
            return build()
        seed = derive_seed(generator)
        with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[] if torch.device(device or "cpu").type == "cpu"
                                                     else [device]):
            torch.manual_seed(seed)  # the layers initialise from the global RNG: one thread at a time
            return build()
