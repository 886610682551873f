# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
The chains: trainable samplers of a batched potential on :math:`\\mathbb R^D`, no Pyro involved.

==============================  ===================================================================
module                          what it holds
==============================  ===================================================================
:mod:`.base`                    :class:`Chain`, the contract every chain keeps and what they share
:mod:`.flow`                    :class:`FlowSampler`: one chain as one preconditioned flow
:mod:`.mixture`                 :class:`MixtureSampler`: one chain as a mixture of flows, one per mode
:mod:`.exact`                   :class:`ExactChain`: a target with nothing to sample (exact evidence)
:mod:`.build`                   :func:`build_sampler` (the mode search picks the kind), :func:`restore_sampler`
==============================  ===================================================================
"""

from .base import Chain
from .build import build_sampler, restore_sampler
from .exact import ExactChain
from .flow import FlowSampler
from .mixture import MixtureSampler

__all__ = ["Chain", "ExactChain", "FlowSampler", "MixtureSampler", "build_sampler", "restore_sampler"]
