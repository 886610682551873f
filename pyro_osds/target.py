# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`PotentialTarget`: a user potential in Pyro's convention (a function of a dict of
**unbatched** unconstrained tensors returning a scalar :math:`U = -\log\rho`, as for
``NUTS(potential_fn=...)``) turned into the flat batched target ``(batch, D) -> (batch,)``
that the engine trains on.

Sites are packed in sorted name order (as Pyro does). The potential is vectorised with
:func:`torch.func.vmap` (verified against a plain loop on a probe batch) or, if vmap fails, looped
over particles with a warning; ``batched=True`` declares a potential that already takes dicts of
``(batch, *shape)`` tensors and returns ``(batch,)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = ["PotentialTarget", "ParamInfo", "pack", "unpack"]


class ParamInfo(NamedTuple):
    """A parameter of a bare potential: name, shape, slice in the flat vector."""

    name: str
    shape: torch.Size
    start: int
    stop: int


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
        v = torch.as_tensor(values[e.name])
        if tuple(v.shape[1:]) != tuple(e.shape):
            raise ValueError(f"{what.capitalize()} {e.name!r} must have shape (batch, {', '.join(map(str, e.shape))}), "
                             f"got {tuple(v.shape)}.")
        parts.append(v.reshape(v.shape[0], -1))
    return torch.cat(parts, dim=-1)


class PotentialTarget:
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
        params, start = [], 0
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
            params.append(ParamInfo(name, value.shape, start, start + value.numel()))
            start += value.numel()
        self.params = params
        self.dim = start
        self.dtype, self.device = dtype, device
        self.potential_fn = potential_fn
        self.transforms = dict(transforms or {})
        unknown = set(self.transforms) - set(initial_params)
        if unknown:
            raise ValueError(f"`transforms` has entries for unknown parameters {sorted(unknown)}.")
        self.batched = bool(batched)
        self.init = self.pack({k: v.detach().unsqueeze(0) for k, v in initial_params.items()})[0]
        self.method = "batched" if self.batched else self._select_method()

    @property
    def sites(self):
        return self.params

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return unpack(self.params, z)

    def pack(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return pack(self.params, params, what="parameter")

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.unpack(z)
        return {k: (self.transforms[k].inv(v) if k in self.transforms else v) for k, v in out.items()}

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.pack({k: (self.transforms[k](v) if k in self.transforms else v) for k, v in values.items()})

    def _single(self, flat: torch.Tensor) -> torch.Tensor:
        return self.potential_fn({p.name: flat[p.start : p.stop].reshape(p.shape) for p in self.params})

    def _vmap(self, z: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(self._single)(z)

    def _loop(self, z: torch.Tensor) -> torch.Tensor:
        values = []
        for row in z:
            value = torch.as_tensor(self._single(row))
            if value.numel() != 1:
                raise ValueError(
                    f"`potential_fn` must return a scalar (0-d tensor) for unbatched inputs, got shape "
                    f"{tuple(value.shape)}; pass `batched_potential=True` if it takes batched tensors."
                )
            values.append(value.reshape(()))
        return torch.stack(values)

    def _batched(self, z: torch.Tensor) -> torch.Tensor:
        return self.potential_fn(self.unpack(z)).reshape(z.shape[0])

    def potential(self, z: torch.Tensor) -> torch.Tensor:
        return {"vmap": self._vmap, "loop": self._loop, "batched": self._batched}[self.method](z)

    def _select_method(self) -> str:
        gen = torch.Generator(device="cpu").manual_seed(12345)
        probe = self.init + 0.1 * torch.randn(3, self.dim, generator=gen, dtype=torch.float64).to(self.dtype).to(
            self.device
        )
        with torch.no_grad():
            try:
                reference = self._loop(probe)
            except ValueError:
                raise
            except Exception as err:
                raise ValueError(f"`potential_fn` failed on a dict of unbatched tensors near `initial_params`: "
                                 f"{type(err).__name__}: {err}") from err
        if not bool(torch.isfinite(reference).all()):
            raise ValueError("`potential_fn` is not finite near `initial_params`; pass a point where it is finite.")
        try:
            z = probe.clone().requires_grad_(True)
            value = self._vmap(z)
            torch.autograd.grad(value.sum(), z)
            tol = 1e-9 if self.dtype == torch.float64 else 1e-4
            ok = bool((((value.detach() - reference).abs()) <= tol * (1 + reference.abs())).all())
        except Exception as err:  # noqa: BLE001 - vmap not applicable: fall back to the loop
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "vmap results disagree with a plain loop"
        if ok:
            return "vmap"
        warnings.warn(
            f"`potential_fn` could not be vectorised with torch.func.vmap ({reason}); evaluating it in a Python "
            "loop, which is slow. Avoid in-place ops, `.item()` and data-dependent control flow, or pass "
            "`batched_potential=True` with a potential that takes batched tensors.",
            UserWarning,
            stacklevel=3,
        )
        return "loop"

    def description(self) -> str:
        return ", ".join(f"{p.name}{tuple(p.shape)}" for p in self.params) + f" (D={self.dim})"
