# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
pyro_osds: one-step diffusion samplers (OSDS) as a Pyro inference backend.

``OSDS(model).run(*args)`` trains a step-conditioned probability-flow sampler on the model's
potential and returns posterior draws with exact importance weights, hence the log evidence
``log Z`` with a standard error, as ArviZ data. The engine's pieces are importable from their
modules (``pyro_osds.samplers.FlowSampler``, ``pyro_osds.ops.*``); see the README's "How the code is
organised".
"""

from ._version import __version__
from .api import OSDS
from .compare import compare
from .config import OSDSConfig
from .convert import to_datatree, to_inference_data
from .inputs import UnsupportedModelError
from .ops.estimators import EvidenceError
from .results import LogEvidence, UnreliableEvidenceWarning
from .train import TrainingDivergedError

__all__ = [
    "EvidenceError",
    "LogEvidence",
    "OSDS",
    "OSDSConfig",
    "TrainingDivergedError",
    "UnreliableEvidenceWarning",
    "UnsupportedModelError",
    "__version__",
    "compare",
    "to_datatree",
    "to_inference_data",
]
