# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`ExactChain`: the chain of a target with nothing to sample (a model with no continuous latent sites: a
fixed "null" model, or one whose latent sites are all enumerated). Its draws are the empty point of
:math:`\mathbb R^0`, with :math:`\log q = 0`, so each weighs :math:`e^{-U} = p(y)`: the evidence, exactly (its
standard error is 0), summed over the enumerated sites. Nothing is trained.
"""

from __future__ import annotations

import math

import torch

from ..ops.precondition import SearchReport
from ..train import COMMON_KEYS
from ..transports import TransportOutput
from .base import Chain

__all__ = ["ExactChain", "PointTransport"]


class PointTransport:
    """The map of :class:`ExactChain`: every base draw goes to the one point of :math:`\\mathbb R^0`, whose density
    is 1."""

    dim = 0

    def __init__(self, point: torch.Tensor):
        self.point = point

    def sample(self, num_samples: int, *, log_det: str = "exact",
               generator: torch.Generator | None = None) -> TransportOutput:
        x = self.point.reshape(1, 0).expand(num_samples, 0)
        log_q = torch.full((num_samples,), math.nan if log_det == "none" else 0.0, dtype=torch.float64,
                           device=self.point.device)
        return TransportOutput(x, log_q, None, "none" if log_det == "none" else "exact")

    def log_prob(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        return (torch.zeros(n, dtype=torch.float64, device=self.point.device),
                torch.ones(n, dtype=torch.bool, device=self.point.device))


class ExactChain(Chain):
    """One chain of a target of dimension 0 (module docstring); the arguments are
    :class:`~pyro_osds.samplers.base.Chain`'s (and, unused, those of the other chains)."""

    def __init__(self, potential_fn, init, config=None, *, generator=None, distributed=None, meter=None, **unused):
        super().__init__(potential_fn, init, config, generator=generator, distributed=distributed, meter=meter)
        if self.dim != 0:
            raise ValueError(f"An ExactChain samples a target of dimension 0, not {self.dim}.")

    def _parts(self) -> list:
        return []

    def fit(self, num_iterations: int | None = None, *, until: int | None = None) -> dict[str, list]:
        """Nothing to fit or train."""
        self._start_fit()
        self.report = SearchReport()
        return {key: [] for key in COMMON_KEYS}

    def fit_preconditioner(self) -> None:
        """No preconditioner."""

    def transport(self, num_steps: int = 1, *, num_probes: int | None = None) -> PointTransport:
        return PointTransport(self.init)

    @property
    def interrupted(self) -> bool:
        return False

    @property
    def iteration(self) -> int:
        return 0

    @property
    def num_skipped(self) -> int:
        return 0

    @property
    def trained_step_counts(self) -> tuple[int, ...] | None:
        return None

    def state_dict(self) -> dict:
        return {"kind": "exact", "dim": 0, **self._common_state()}

    def load_state_dict(self, state: dict) -> None:
        self._load_common_state(state)
