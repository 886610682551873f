# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`MixtureSampler`: one chain as a mixture of flows, one per separated mode of the target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import OSDSConfig
from ..cost import CostMeter
from ..distributed import DistributedContext, broadcast_object
from ..ops.mode_search import LaplacePartition, ModeSearch
from ..ops.precondition import SearchReport, refine_component
from ..train import COMMON_KEYS
from ..transports import MixtureTransport
from ..util import PotentialFn, derive_seed, seeded_generator
from .base import Chain
from .flow import FlowSampler

__all__ = ["MixtureSampler"]


class MixtureSampler(Chain):
    r"""
    One chain as a mixture :math:`q = \sum_k \alpha_k q_k` with one component per separated mode a mode
    search found (:func:`~pyro_osds.ops.mode_search.search_modes`). The modes' Laplace fits define a
    partition of unity :math:`s_k` (:class:`~pyro_osds.ops.mode_search.LaplacePartition`), so that
    :math:`Z = \sum_k Z_k` with :math:`Z_k = \int \pi s_k`; component :math:`k` is a
    :class:`~pyro_osds.samplers.flow.FlowSampler` preconditioned at mode :math:`k` (its Laplace fit, refined as
    ``config.preconditioner.kind`` asks) and trained on the piece :math:`\pi s_k`, which keeps it at that mode. A
    component whose untrained one-step map already fits its piece
    (:meth:`~pyro_osds.samplers.flow.FlowSampler.fits_untrained`, with early stopping on) is not trained. Draws
    come from the :class:`~pyro_osds.transports.MixtureTransport`, each weighted by :math:`\pi s_k / q_k`
    (multiple importance sampling with the partition as weighting functions), so the weights are exact and
    :math:`\hat Z` unbiased whatever :math:`\alpha` is, and no component's density is needed at another's
    draws; after training, :math:`\alpha_k` is set from the pilot estimates :math:`\hat Z_k` (with a tenth
    spread evenly), so that draws go where the mass is.

    The constructor's arguments are :class:`~pyro_osds.samplers.flow.FlowSampler`'s, with the ``search`` that found
    the modes.
    """

    def __init__(self, potential_fn: PotentialFn, init: torch.Tensor, config: OSDSConfig, search: ModeSearch, *,
                 generator: torch.Generator | None = None, hook_fn: Callable | None = None,
                 on_iteration: Callable | None = None,
                 disable_progbar: bool = False, desc: str = "OSDS", distributed: DistributedContext | None = None,
                 meter: CostMeter | None = None):
        super().__init__(potential_fn, init, config, generator=generator, distributed=distributed, meter=meter)
        self.search = search
        self.partition = LaplacePartition(search.modes)
        self.components = [
            FlowSampler(self.partition.restricted(potential_fn, k), affine.shift, config,
                        generator=seeded_generator(self.device, derive_seed(self.generator)), hook_fn=hook_fn,
                        on_iteration=on_iteration, disable_progbar=disable_progbar, desc=f"{desc} component {k}",
                        distributed=distributed, meter=self.meter)
            for k, (affine, _) in enumerate(search.modes)
        ]
        #: the mixture weights :math:`\alpha` (the Laplace masses until :meth:`fit` estimates them)
        self.weights = torch.tensor([w for _, w in search.modes], dtype=torch.float64, device="cpu")
        #: per component: trained (True), fits without training (False), not decided yet (None)
        self.trained: list[bool | None] = [None] * len(self.components)
        self.report = SearchReport.of_search(search)

    def _parts(self) -> list:
        return self.components

    @property
    def trained_step_counts(self) -> tuple[int, ...] | None:
        return self.components[0].trained_step_counts

    @property
    def mixture(self) -> tuple[torch.Tensor, list[float]]:
        """The components' locations (their modes' centres) and the mixture weights."""
        return torch.stack([a.shift for a, _ in self.search.modes]), self.weights.tolist()

    def fit_preconditioner(self) -> None:
        """Refines each component's preconditioner from its mode's Laplace fit (once)."""
        for component, (laplace, _) in zip(self.components, self.search.modes, strict=True):
            if component.preconditioner is not None:
                continue
            with self.meter.phase("preconditioner"):
                affine, fit = refine_component(component.potential_fn, laplace, self.config.preconditioner,
                                               generator=component.generator)
                if self.distributed is not None:
                    affine, fit = component.from_rank_zero(affine, fit)
                component.preconditioner = affine.to(dtype=component.dtype)
                component.report = SearchReport(fit=fit)

    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """Fits the components' preconditioners, trains the components that need it (class docstring)
        and sets the mixture weights; returns the training history, concatenated over components."""
        self._start_fit()
        self.fit_preconditioner()
        history: dict[str, list] = {key: [] for key in COMMON_KEYS}
        with self.meter.phase("training"):
            for k, component in enumerate(self.components):
                if self.trained[k] is not False:
                    for key, values in component.fit(num_iterations, until=until).items():
                        history.setdefault(key, []).extend(values)
                    self.trained[k] = component.iteration > 0
                    if component.interrupted:
                        return history
            self._set_weights()
        return history

    def _set_weights(self) -> None:
        log_z = torch.tensor([c.draw(self.num_pilot // 4, 1, generator=self.draw_generator).evidence().log_z
                              for c in self.components], dtype=torch.float64, device="cpu")
        laplace = torch.tensor([w for _, w in self.search.modes], dtype=torch.float64, device="cpu")
        share = torch.softmax(log_z, 0) if bool(torch.isfinite(log_z).all()) else laplace
        weights = 0.9 * share + 0.1 / len(self.components)
        self.weights = weights if self.distributed is None else broadcast_object(weights, self.distributed)

    @property
    def interrupted(self) -> bool:
        return any(c.interrupted for c in self.components)

    @property
    def iteration(self) -> int:
        return max(c.iteration for c in self.components)

    @property
    def num_skipped(self) -> int:
        return sum(c.num_skipped for c in self.components)

    def transport(self, num_steps: int = 1, *, num_probes: int | None = None) -> MixtureTransport:
        """The mixture of the components' transports with ``num_steps`` steps."""
        self.fit_preconditioner()
        return MixtureTransport([c.transport(num_steps, num_probes=num_probes) for c in self.components],
                                self.weights, partition=self.partition)

    def state_dict(self) -> dict:
        """The modes (their Laplace fits and masses), the components, the mixture weights and generators."""
        self.fit_preconditioner()
        return {
            "kind": "mixture",
            "modes": [(a.shift.detach().clone(), a.scale_tril.detach().clone(), float(w)) for a, w in self.search.modes],
            "num_light": self.search.num_light,
            "components": [c.state_dict() for c in self.components],
            "weights": self.weights.clone(),
            "trained": [-1 if t is None else int(t) for t in self.trained],
            **self._common_state(),
            "dim": self.dim,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["components"]) != len(self.components):
            raise ValueError(f"State has {len(state['components'])} components, this sampler {len(self.components)}.")
        for component, component_state in zip(self.components, state["components"], strict=True):
            component.load_state_dict(component_state)
        self.weights = state["weights"].to(torch.float64)
        self.trained = [None if t < 0 else bool(t) for t in state["trained"]]
        self._load_common_state(state)


