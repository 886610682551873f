# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
pyro_osds: one-step diffusion samplers (OSDS) as a Pyro inference backend.

``OSDS(model).run(*args)`` trains a step-conditioned probability-flow sampler on the model's
potential and returns posterior draws with exact importance weights, hence the log evidence
``log Z`` with a standard error, as ArviZ data.
"""

from ._version import __version__
from .api import OSDS, LogEvidence
from .compare import compare
from .config import PRESETS, OSDSConfig
from .convert import to_datatree, to_inference_data
from .estimators import Estimates, EvidenceError, evidence, forward_evidence, kish_ess, pareto_k_hat
from .potential import ModelTarget, UnsupportedModelError
from .sampler import Draws, FlowSampler
from .train import TrainingDivergedError

__all__ = [
    "PRESETS",
    "Draws",
    "Estimates",
    "EvidenceError",
    "FlowSampler",
    "LogEvidence",
    "ModelTarget",
    "OSDS",
    "OSDSConfig",
    "TrainingDivergedError",
    "UnsupportedModelError",
    "__version__",
    "compare",
    "evidence",
    "forward_evidence",
    "kish_ess",
    "pareto_k_hat",
    "to_datatree",
    "to_inference_data",
]
