# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Building a chain: its mode search decides between one flow and a mixture with a component per mode
(:func:`build_sampler`); a saved chain is rebuilt without searching again (:func:`restore_sampler`).
"""

from __future__ import annotations

import torch

from ..config import OSDSConfig
from ..cost import CostMeter
from ..distributed import from_rank_zero
from ..ops.affine import AffineMap
from ..ops.mode_search import ModeSearch
from ..train import stage_report
from ..util import PotentialFn, seeded_generator, tensor_on_its_device
from .base import Chain
from .exact import ExactChain
from .flow import FlowSampler
from .mixture import MixtureSampler

__all__ = ["build_sampler", "restore_sampler"]


def build_sampler(potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig | None = None, *,
                  generator: torch.Generator | None = None, **kwargs) -> Chain:
    """
    One chain for ``potential_fn``: an :class:`ExactChain` for a target of dimension 0, else it runs the mode
    search ``config.preconditioner`` asks for, then returns a
    :class:`MixtureSampler` with a component per mode when it found several separated ones
    (:meth:`~pyro_osds.ops.precondition.PreconditionConfig.wants_components`), else a :class:`FlowSampler`
    preconditioned from the search's result. ``kwargs`` go to the sampler (``hook_fn``, ``disable_progbar``,
    ``desc``, ``distributed``, ``meter``: what counts its cost, the search's included), but ``start`` (a single
    flow's Gaussian start) and ``standard`` (the coordinates in which the potential is known to be standard normal
    and independent of the rest, :attr:`~pyro_osds.target.FlatTarget.standard_coordinates`: the search holds them
    at 0).
    """
    config = OSDSConfig() if config is None else config
    init = tensor_on_its_device(init)
    start = kwargs.pop("start", None)  # a single flow's Gaussian start (FlatTarget.gaussian_start)
    standard = kwargs.pop("standard", None)  # coordinates the search may hold at 0 (FlatTarget.standard_coordinates)
    generator = seeded_generator(init.device) if generator is None else generator
    kwargs.setdefault("meter", CostMeter())
    if init.numel() == 0:  # nothing to sample: the evidence is exact
        return ExactChain(potential_fn, init, config, generator=generator, **kwargs)
    pre = config.preconditioner
    if pre.kind == "none" or pre.mode_search_starts == 0:
        return FlowSampler(potential_fn, init, config, generator=generator, start=start, **kwargs)
    ctx, meter = kwargs.get("distributed"), kwargs["meter"]
    with meter.phase("search"), stage_report(kwargs.get("desc", "OSDS"),
                                             f"mode search ({pre.mode_search_starts} starts per round)",
                                             kwargs.get("disable_progbar", False)):
        search = None
        if ctx is None or ctx.is_main:
            search = pre.search(meter.counted(potential_fn), init.detach(), generator=generator, standard=standard)
    if ctx is not None:  # rank 0 searches; every rank takes its modes and its random stream
        search = from_rank_zero(search, generator, ctx)
        search = search._replace(modes=[(a.to(device=init.device), w) for a, w in search.modes])
    if pre.wants_components(search):
        return MixtureSampler(potential_fn, init, config, search, generator=generator, **kwargs)
    return FlowSampler(potential_fn, init, config, search=search, generator=generator, start=start, **kwargs)


def restore_sampler(potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig, state: dict, *,
                    generator: torch.Generator | None = None, **kwargs) -> Chain:
    """The chain saved as ``state`` (:meth:`FlowSampler.state_dict` or :meth:`MixtureSampler.state_dict`),
    rebuilt without searching or fitting again."""
    kwargs.pop("start", None)  # nothing is fitted or searched again
    kwargs.pop("standard", None)
    if state.get("kind") == "exact":
        sampler = ExactChain(potential_fn, init, config, generator=generator, **kwargs)
    elif state.get("kind") == "mixture":
        modes = [(AffineMap(shift, tril), mass) for shift, tril, mass in state["modes"]]
        search = ModeSearch(modes, int(state["num_light"]), True, 0)
        sampler = MixtureSampler(potential_fn, init, config, search, generator=generator, **kwargs)
    else:
        sampler = FlowSampler(potential_fn, init, config, generator=generator, **kwargs)
    sampler.load_state_dict(state)
    return sampler
