# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The flat target contract, and its adapter for bare potentials.

Everything between the Pyro boundary and the numerics sees a :class:`FlatTarget`: a batched
potential :math:`U: (\text{batch}, D) \to (\text{batch},)` on the unconstrained space, a starting
point, and the packing between flat vectors and named sites (:class:`Site`, in sorted name order, as
Pyro does). Two adapters meet it:

* :class:`PotentialTarget` (here): a user potential in Pyro's convention, a function of a dict of
  **unbatched** unconstrained tensors returning a scalar :math:`U = -\log\rho` (as for
  ``NUTS(potential_fn=...)``); ``batched=True`` declares one that already takes dicts of
  ``(batch, *shape)`` tensors and returns ``(batch,)``;
* :class:`~pyro_osds.model.ModelTarget`: a Pyro model.

Both choose how to evaluate the potential on a batch with one probe
(:meth:`FlatTarget.select_vectorization`): each candidate (e.g. :func:`torch.func.vmap`) must
reproduce an unbatched reference on three points near the starting point and support second
derivatives (exact weights need the potential's Hessian); otherwise a Python loop is used, with a
warning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from .util import raise_device_errors, tensor_on_its_device, warn

__all__ = ["FlatTarget", "PotentialTarget", "Site", "pack", "unpack"]


class Site(NamedTuple):
    """A named block of the flat vector: name, unconstrained ``shape``, its slice ``start:stop``, the
    constrained shape (``None``: the same) and the number of the site's distribution batch dims."""

    name: str
    shape: torch.Size
    start: int
    stop: int
    constrained_shape: torch.Size | None = None
    batch_ndim: int = 0


def unpack(entries, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """``(batch, D)`` -> ``{name: (batch, *shape)}`` for entries with ``name``, ``shape``, ``start``, ``stop``."""
    return {e.name: z[:, e.start : e.stop].reshape((z.shape[0],) + tuple(e.shape)) for e in entries}


def pack(entries, values: dict, *, what: str = "parameter") -> torch.Tensor:
    """``{name: (batch, *shape)}`` -> ``(batch, D)`` in the entries' order; errors name the entry."""
    missing = [e.name for e in entries if e.name not in values]
    if missing:
        raise ValueError(f"Missing {what}s {missing}; expected {[e.name for e in entries]}.")
    parts = []
    for e in entries:
        v = tensor_on_its_device(values[e.name])
        if tuple(v.shape[1:]) != tuple(e.shape):
            raise ValueError(f"{what.capitalize()} {e.name!r} must have shape (batch, {', '.join(map(str, e.shape))}), "
                             f"got {tuple(v.shape)}.")
        parts.append(v.reshape(v.shape[0], -1))
    return torch.cat(parts, dim=-1)


class FlatTarget:
    r"""
    The contract of a flat unconstrained target (module docstring). Adapters set ``sites``,
    ``transforms`` (site -> constrained-to-unconstrained transform; sites without one are
    unconstrained), ``init`` ``(D,)`` and ``vectorize`` (the name of the selected batched potential in
    ``_potentials``).
    """

    #: how a site's value is called in error messages
    site_kind = "parameter"
    #: the model's sites drawn in non-centred form (:mod:`pyro_osds.reparam`); reported as functions of the draws
    noncentered_sites: tuple[str, ...] = ()
    #: the model's sites drawn whitened given the others (:mod:`pyro_osds.whitening`); reported in the model's form
    whitened_sites: tuple[str, ...] = ()
    #: the model's potential evaluations in one row of :meth:`potential` (:attr:`~pyro_osds.cost.Cost` counts them)
    evaluations_per_row: int = 1
    #: where that number varies, a function returning the model evaluations of this thread's last call of
    #: :meth:`potential` (:class:`~pyro_osds.cost.CostMeter`), else ``None``
    last_evaluations = None
    #: a Gaussian (:class:`~pyro_osds.ops.affine.AffineMap`) the preconditioner's fit may start from, in the flat
    #: space (the mean-field fit of the parameterisation choice), or ``None``
    gaussian_start = None
    #: the coordinates (``long``) in which :meth:`potential` is :math:`\tfrac12 z_i^2` plus a function of the others
    #: (exactly for a conditionally Gaussian block drawn whitened, to second order for one in its Laplace form:
    #: :class:`~pyro_osds.whitening.WhitenedTarget`), which the mode search holds at 0, or ``None``
    standard_coordinates = None
    sites: list[Site]
    transforms: dict
    init: torch.Tensor
    vectorize: str
    _potentials: dict[str, Callable[[torch.Tensor], torch.Tensor]]

    @property
    def dim(self) -> int:
        return self.init.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.init.dtype

    @property
    def device(self) -> torch.device:
        return self.init.device

    def add_discrete(self, draws: list, distributed=None) -> list:
        """``draws`` with draws of the target's discrete sites: none here (:class:`~pyro_osds.model.ModelTarget`
        has enumerated ones)."""
        return draws

    def potential(self, z: torch.Tensor) -> torch.Tensor:
        r"""Batched potential ``(batch, D) -> (batch,)`` by the selected :attr:`vectorize` method."""
        return self._potentials[self.vectorize](z)

    # ------------------------------------------------------------------------------------------
    # packing
    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(batch, D)`` -> dict of unconstrained ``(batch, *site_shape)``."""
        return unpack(self.sites, z)

    def pack(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """dict of unconstrained ``(batch, *site_shape)`` -> ``(batch, D)`` (sorted site order)."""
        return pack(self.sites, params, what=self.site_kind)

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(batch, D)`` unconstrained -> dict of constrained values ``(batch, *shape)``."""
        return {k: (self.transforms[k].inv(v) if k in self.transforms else v) for k, v in self.unpack(z).items()}

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """dict of constrained ``(batch, *shape)`` -> ``(batch, D)``."""
        return self.pack({s.name: (self.transforms[s.name](tensor_on_its_device(values[s.name]))
                                   if s.name in self.transforms else values[s.name]) for s in self.sites})

    # ------------------------------------------------------------------------------------------
    # choosing the batched potential
    def probe_points(self) -> torch.Tensor:
        """Three fixed points ``init + 0.1 N(0, I)`` (seed 12345) where the candidates are checked."""
        gen = torch.Generator(device="cpu").manual_seed(12345)
        noise = torch.randn(3, self.dim, generator=gen, dtype=torch.float64, device="cpu").to(dtype=self.dtype,
                                                                                            device=self.device)
        return self.init.unsqueeze(0) + 0.1 * noise

    def _verify(self, name: str, probe: torch.Tensor, reference: torch.Tensor) -> str | None:
        """None if the batched potential ``name`` reproduces ``reference`` at ``probe`` and supports
        second derivatives; else the reason."""
        try:
            z = probe.clone().requires_grad_(True)
            value = self._potentials[name](z)
            (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True)
            torch.autograd.grad(grad[:, 0].sum(), z, allow_unused=True)
        except Exception as err:  # noqa: BLE001 - any failure of a vectorisation strategy means "try the next"
            raise_device_errors(err)  # but not a device's: the next would be silently slower there
            return f"{type(err).__name__}: {err}"
        if value.shape != reference.shape:
            return f"returned shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
        tol = 1e-9 if self.dtype == torch.float64 else 1e-4
        err = (value.detach() - reference).abs() / (1.0 + reference.abs())
        if not bool(torch.isfinite(value).all()) or float(err.max()) > tol:
            return f"disagrees with the unbatched potential (relative error {float(err.max()):.2e})"
        return None

    #: a later candidate replaces the first that works only if it is this many times faster
    FASTER_BY = 2.0

    #: rows the candidates are timed on (the probe points repeated): per-particle costs show at a batch's scale
    TIMING_ROWS = 16

    def _seconds(self, name: str, probe: torch.Tensor, repeats: int = 3) -> float:
        """The best of ``repeats`` timings of the batched potential ``name`` with its gradient, on
        :attr:`TIMING_ROWS` rows (the ``probe`` points repeated)."""
        rows = probe.detach().repeat(-(-self.TIMING_ROWS // probe.shape[0]), 1)[: self.TIMING_ROWS]
        best = math.inf
        for _ in range(repeats):
            z = rows.clone().requires_grad_(True)
            start = time.perf_counter()
            (grad,) = torch.autograd.grad(self._potentials[name](z).sum(), z)
            best = min(best, time.perf_counter() - start)
        return best

    def select_vectorization(self, candidates, probe: torch.Tensor, reference: torch.Tensor, *,
                             forced: str | None = None, fallback: str = "loop") -> str:
        """
        The first of ``candidates`` (names in ``_potentials``) that passes :meth:`_verify` against the
        unbatched ``reference`` values at ``probe``, unless a later one that passes is :attr:`FASTER_BY` times
        faster there (timed with the gradient, on the probe points: e.g. ``torch.func.vmap`` over a
        ``MultivariateNormal`` copies its Cholesky factor for every particle, where a plate broadcasts one);
        ``fallback`` with a warning (:meth:`_fallback_warning`) when none does, or an error when ``forced`` fails.
        """
        if not bool(torch.isfinite(reference).all()):
            raise ValueError(self._not_finite_message)
        if forced == fallback:
            return fallback
        candidates = [forced] if forced else list(candidates)
        reasons, working = {}, []
        for name in candidates:
            reason = self._verify(name, probe, reference)
            if reason is None:
                working.append(name)
            else:
                reasons[name] = reason
        seconds = {}
        for name in working:  # also a check at a batch's size: 3 probe rows can pass by a coincidence of shapes
            try:
                seconds[name] = self._seconds(name, probe)
            except (RuntimeError, ValueError, IndexError) as err:
                raise_device_errors(err)
                reasons[name] = f"fails on {self.TIMING_ROWS} rows ({type(err).__name__}: {str(err)[:200]})"
        working = [name for name in working if name in seconds]
        if working:
            fastest = min(working, key=seconds.get)
            return fastest if seconds[working[0]] > self.FASTER_BY * seconds[fastest] else working[0]
        if forced:
            raise ValueError(f"`vectorize={forced!r}` does not work for this model: {reasons[forced]}.")
        warn(self._fallback_warning(reasons))
        return fallback

    _not_finite_message = "The potential is not finite near the initial point; pass a point where it is finite."

    def _fallback_warning(self, reasons: dict) -> str:
        return ("The potential could not be vectorised (" + "; ".join(f"{k}: {v}" for k, v in reasons.items())
                + "), so OSDS evaluates it in a Python loop, which is slow.")


class PotentialTarget(FlatTarget):
    r"""
    The flat target of a bare potential (module docstring).

    :param callable potential_fn: ``dict[str, Tensor] -> scalar Tensor`` (or batched, see ``batched``).
    :param dict initial_params: ``{name: tensor}`` giving every parameter's shape, dtype and device
        and a point where the potential is finite.
    :param dict transforms: optional ``{name: transform}`` mapping constrained values to the
        unconstrained space of the potential (as in :class:`pyro.infer.HMC`); draws are returned
        through ``transform.inv``.
    :param bool batched: the potential already takes ``(batch, *shape)`` tensors and returns ``(batch,)``.
    """

    _not_finite_message = "`potential_fn` is not finite near `initial_params`; pass a point where it is finite."

    def __init__(
        self,
        potential_fn: Callable,
        initial_params: dict,
        *,
        transforms: dict | None = None,
        batched: bool = False,
    ):
        if not callable(potential_fn):
            raise TypeError(f"`potential_fn` must be callable, got {type(potential_fn).__name__}.")
        if not isinstance(initial_params, dict) or not initial_params:
            raise ValueError(
                "`initial_params` must be a non-empty dict {name: tensor} giving the shape of each parameter of "
                "`potential_fn`, e.g. `initial_params={'x': torch.zeros(3)}`."
            )
        dtype = device = None
        sites, start = [], 0
        for name in sorted(initial_params):
            value = initial_params[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"`initial_params[{name!r}]` must be a torch.Tensor, got {type(value).__name__}.")
            if not value.is_floating_point():
                raise TypeError(f"`initial_params[{name!r}]` must be a floating point tensor, got {value.dtype}; "
                                "OSDS samples continuous parameters.")
            if dtype is None:
                dtype, device = value.dtype, value.device
            elif value.dtype != dtype or value.device != device:
                raise ValueError(
                    f"All `initial_params` must share one dtype and device; {name!r} has {value.dtype} on "
                    f"{value.device}, others {dtype} on {device}."
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"`initial_params[{name!r}]` contains NaN or infinite values.")
            sites.append(Site(name, value.shape, start, start + value.numel()))
            start += value.numel()
        self.sites = sites
        self.potential_fn = potential_fn
        self.transforms = dict(transforms or {})
        unknown = set(self.transforms) - set(initial_params)
        if unknown:
            raise ValueError(f"`transforms` has entries for unknown parameters {sorted(unknown)}.")
        self.batched = bool(batched)
        self.init = self.pack({k: v.detach().unsqueeze(0) for k, v in initial_params.items()})[0]
        self._potentials = {"vmap": self._vmap, "loop": self._loop, "batched": self._batched}
        self.vectorize = "batched" if self.batched else self._select()

    def _single(self, flat: torch.Tensor) -> torch.Tensor:
        return self.potential_fn({s.name: flat[s.start : s.stop].reshape(s.shape) for s in self.sites})

    def _vmap(self, z: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(self._single)(z)

    def _loop(self, z: torch.Tensor) -> torch.Tensor:
        values = []
        for row in z:
            value = tensor_on_its_device(self._single(row))
            if value.numel() != 1:
                raise ValueError(
                    f"`potential_fn` must return a scalar (0-d tensor) for unbatched inputs, got shape "
                    f"{tuple(value.shape)}; pass `batched_potential=True` if it takes batched tensors."
                )
            values.append(value.reshape(()))
        return torch.stack(values)

    def _batched(self, z: torch.Tensor) -> torch.Tensor:
        return self.potential_fn(self.unpack(z)).reshape(z.shape[0])

    def _select(self) -> str:
        probe = self.probe_points()
        with torch.no_grad():
            try:
                reference = self._loop(probe)
            except ValueError:
                raise
            except Exception as err:
                raise ValueError(f"`potential_fn` failed on a dict of unbatched tensors near `initial_params`: "
                                 f"{type(err).__name__}: {err}") from err
        return self.select_vectorization(["vmap"], probe, reference)

    def _fallback_warning(self, reasons: dict) -> str:
        return (f"`potential_fn` could not be vectorised with torch.func.vmap ({reasons['vmap']}); evaluating it in a "
                "Python loop, which is slow. Avoid in-place ops, `.item()` and data-dependent control flow, or pass "
                "`batched_potential=True` with a potential that takes batched tensors.")
