# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
The checks of a Pyro model and its data, once, from one trace of the model, before anything is trained: what
OSDS cannot sample (subsampled plates, latent sites of infinite discrete support, improper priors) and data its
likelihood cannot take (a shape that does not broadcast with its site, non-finite values, a dtype the distribution
refuses, values outside its support). Each error is a :class:`ValueError` (or
:class:`~pyro_osds.model.UnsupportedModelError`) that names the site, says what was found and how to fix it.
"""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .util import raise_device_errors

__all__ = ["UnsupportedModelError", "check_model", "is_computed", "nonfinite_arguments"]


class UnsupportedModelError(ValueError):
    """The model has a feature OSDS cannot handle (the message names the site and the fix)."""


class _LastSite(Messenger):
    """Remembers the last sample site the model reached (the one whose sampling failed, if any)."""

    def __init__(self):
        super().__init__()
        self.site = None

    def _pyro_sample(self, msg):
        self.site = msg


def _where(mask: torch.Tensor) -> str:
    """The first index where ``mask`` holds, as ``(i, j, ...)`` (or ``()`` for a scalar)."""
    return str(tuple(int(i) for i in torch.nonzero(mask)[0])) if mask.dim() else "()"


def _unmasked(bad: torch.Tensor, mask, event_dim: int) -> torch.Tensor:
    """``bad`` (per element of a site's value) where the site's ``mask`` lets the data count."""
    if mask is None or mask is True:
        return bad
    if mask is False:
        return torch.zeros_like(bad)
    try:
        return bad & mask.reshape(mask.shape + (1,) * event_dim).to(torch.bool)
    except RuntimeError as err:  # a mask Pyro could not apply either: let Pyro say so
        raise_device_errors(err)
        return bad


def _check_improper(site: dict, err: NotImplementedError) -> None:
    fn = site["fn"]
    kind = type(fn).__name__
    if isinstance(fn, pyro.distributions.ImproperUniform):
        raise UnsupportedModelError(
            f"Latent site {site['name']!r} has an improper prior ({kind}): the evidence of a model with an improper "
            "prior is undefined (its log Z is infinite, or set by an arbitrary constant), so OSDS cannot estimate "
            "it. Give the site a proper prior (e.g. a wide Normal) to compare models by their evidence; for the "
            "posterior alone, use NUTS.") from err
    raise UnsupportedModelError(
        f"Latent site {site['name']!r} cannot be sampled from its distribution ({kind}: {err}), so OSDS cannot "
        "start from its prior. Give it a distribution that can be sampled, or condition on it.") from err


def _check_observed(name: str, site: dict) -> None:
    """The data of observed site ``name`` against its distribution (module docstring)."""
    value, fn = site["value"], site["fn"]
    if not isinstance(value, torch.Tensor):
        return
    kind = type(fn).__name__
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    try:
        torch.broadcast_shapes(tuple(value.shape), shape)
    except RuntimeError:
        plates = ", ".join(f"{f.name!r} (size {f.size}, dim {f.dim})" for f in site["cond_indep_stack"]
                           if f.vectorized)
        raise ValueError(
            f"Observed site {name!r}: its data have shape {tuple(value.shape)}, which does not broadcast with its "
            f"distribution's shape {shape} ({kind}: batch shape {tuple(fn.batch_shape)}, event shape "
            f"{tuple(fn.event_shape)}{'; plates ' + plates if plates else ''}). Give the data the shape {shape} "
            "(e.g. `.reshape(...)` or `.squeeze(-1)`), or declare their trailing dimensions as an event with "
            "`.to_event(...)`.") from None
    event_dim = len(fn.event_shape)
    if value.is_floating_point():
        bad = _unmasked(~torch.isfinite(value), site["mask"], event_dim)
        if bool(bad.any()):
            raise ValueError(
                f"Observed site {name!r} holds {int(bad.sum())} non-finite value(s) (the first, "
                f"{float(value[bad][0])}, at index {_where(bad)}): the likelihood is not defined there. Drop or impute "
                "them, or leave them out with `poutine.mask(mask=...)` or the site's `obs_mask`.")
    try:
        fn.log_prob(value)
    except (RuntimeError, ValueError, TypeError) as err:
        if not value.is_floating_point() and not value.is_complex():
            raise ValueError(
                f"Observed site {name!r}: its data are {value.dtype}, which {kind}.log_prob cannot take ({err}). "
                f"Pass floating-point data, e.g. `y.float()` or `y.to(X.dtype)` for the tensor you pass as "
                f"{name!r}.") from err
        raise ValueError(
            f"Observed site {name!r}: {kind}.log_prob cannot take its data (shape {tuple(value.shape)}, dtype "
            f"{value.dtype}): {err}") from err
    try:
        inside = fn.support.check(value)
    except (NotImplementedError, RuntimeError, ValueError, TypeError) as err:  # a support that depends on the sample
        raise_device_errors(err)
        return
    outside = _unmasked(~inside.to(torch.bool), site["mask"], 0)
    if bool(outside.any()):
        first = value[outside] if outside.shape == value.shape else None
        found = f"e.g. {first[0].tolist()} " if first is not None and first.numel() else ""
        raise ValueError(
            f"Observed site {name!r} holds {int(outside.sum())} value(s) outside the support of its distribution "
            f"({kind}: {fn.support}), {found}at index {_where(outside)}: their likelihood is zero. Check the data "
            "(labels coded 0/1 for a Bernoulli, non-negative counts for a Poisson, ...) or the distribution.")


def is_computed(site: dict) -> bool:
    """Whether a sample site is a function of the latent sites, not data: a ``pyro.deterministic`` site, or what a
    Pyro reparameteriser (``poutine.reparam``, e.g. ``LocScaleReparam``) leaves of the site it reparameterises,
    an observed ``Delta`` masked out (the same site without the ``_deterministic`` flag)."""
    if site["infer"].get("_deterministic", False):
        return True
    fn = site["fn"]
    return (site["is_observed"] and isinstance(fn, pyro.distributions.MaskedDistribution) and fn._mask is False
            and isinstance(fn.base_dist, pyro.distributions.Delta))


def check_model(model, args: tuple, kwargs: dict, transforms: dict | None = None) -> poutine.Trace:
    """Traces ``model(*args, **kwargs)`` once and refuses, before anything is trained, what OSDS cannot sample and
    data its likelihood cannot take (module docstring), ``transforms`` the user's for some latent sites; returns the
    trace."""
    last = _LastSite()
    try:
        with poutine.block(), pyro.validation_enabled(False), last:
            trace = poutine.trace(model).get_trace(*args, **kwargs)
    except NotImplementedError as err:
        if last.site is not None and not last.site["is_observed"]:
            _check_improper(last.site, err)
        raise
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.size != frame.full_size:
                raise UnsupportedModelError(
                    f"OSDS does not support subsampling: plate {frame.name!r} (at site {name!r}) uses "
                    f"{frame.size} of {frame.full_size} data points. Remove `subsample_size` / `subsample` from "
                    "the plate (OSDS, like NUTS, needs the full-data potential)."
                )
        if site["is_observed"]:
            if not is_computed(site) and not site["infer"].get("is_auxiliary", False):
                _check_observed(name, site)
            continue
        masks = [site["mask"]]
        if isinstance(site["fn"], pyro.distributions.MaskedDistribution):  # `dist.Normal(...).mask(False)`
            masks.append(site["fn"]._mask)
        masked = any(m is False or (isinstance(m, torch.Tensor) and not bool(m.all())) for m in masks)
        scale = site["scale"]
        if masked or bool((scale == 0).any() if isinstance(scale, torch.Tensor) else scale == 0):
            raise UnsupportedModelError(
                f"Latent site {name!r} has a masked (or zero-scaled) prior, which makes it improper (flat): the "
                "evidence of a model with an improper prior is undefined, so OSDS cannot estimate it. Give the site "
                "a proper prior (e.g. a wide Normal) instead of masking its density out.")
        if isinstance(_base_distribution(site["fn"]), pyro.distributions.Delta):
            raise UnsupportedModelError(
                f"Latent site {name!r} is a Delta (a point mass), which has no density to sample: its value is a "
                f"function of others. Record it with `pyro.deterministic({name!r}, value)` instead (it is then "
                "reported with the draws), or observe it (`obs=`).")
        support = site["fn"].support
        try:
            discrete = support.is_discrete
        except NotImplementedError:  # a dependent support, which neither OSDS nor Pyro's NUTS can map
            discrete = False
        if discrete and not site["fn"].has_enumerate_support:
            raise UnsupportedModelError(
                f"Latent site {name!r} is discrete with infinite support ({type(site['fn']).__name__}), which "
                "cannot be enumerated. Marginalise it by hand, make it continuous, or condition on it "
                f"(e.g. `pyro.condition(model, data={{{name!r}: value}})`)."
            )
        if not discrete and name not in (transforms or {}):
            _check_support_transform(name, site)
    return trace


def _base_distribution(fn):
    """``fn`` without its ``Independent`` / masking wrappers."""
    while isinstance(fn, (torch.distributions.Independent, pyro.distributions.MaskedDistribution)):
        fn = fn.base_dist
    return fn


def _check_support_transform(name: str, site: dict) -> None:
    """A continuous latent site is drawn unconstrained through ``biject_to(support)``: refuse, naming the site and the
    fix, a support torch registers no bijection for (a ``MixtureSameFamily``'s)."""
    support = site["fn"].support
    try:
        torch.distributions.biject_to(support)
    except NotImplementedError:
        base = getattr(support, "base_constraint", None)
        hint = ""
        if base is not None:
            hint = (f" Its components' support is {base}: `transforms={{{name!r}: "
                    "torch.distributions.biject_to(<that constraint>).inv}`, e.g. "
                    "`torch.distributions.transforms.identity_transform` for components on the real line.")
        raise UnsupportedModelError(
            f"Latent site {name!r} ({type(site['fn']).__name__}) has a support ({type(support).__name__}) for which "
            "torch registers no bijection to the real line (`torch.distributions.biject_to`), and OSDS draws every "
            f"continuous site unconstrained. Give one: `OSDS(model, transforms={{{name!r}: T}})` with T the map from "
            f"the site's support to the real line.{hint}") from None


def nonfinite_arguments(args: tuple, kwargs: dict) -> list[str]:
    """The model's tensor arguments that hold non-finite values, each as ``"argument 0 (first at index (i, j))"``
    or ``"keyword 'X' (...)"``: data a likelihood cannot take, which a potential that is nowhere finite points to."""
    found = []
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [(f"keyword {k!r}", v) for k, v in kwargs.items()]
    for label, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                found.append(f"{label} ({int(bad.sum())} non-finite, the first at index {_where(bad)})")
    return found
