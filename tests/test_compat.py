# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of the deprecated names of the development layout (pyro_osds._compat and the deprecated attributes):
each still works and warns with its replacement."""

import importlib
import sys

import pytest
import torch

import pyro_osds
from pyro_osds._compat import MOVED_MODULES


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_moved_modules_import_with_a_warning_naming_the_new_home(old):
    new = MOVED_MODULES[old][0]
    sys.modules.pop(old, None)
    with pytest.warns(FutureWarning, match=f"`{old}` is deprecated; import from `{new[0]}`") as record:
        __import__(old)  # as an import statement does
    assert record[0].filename == __file__  # the warning points at the importing line, not at the package
    module = sys.modules[old]
    target = importlib.import_module(new[0])
    for name in getattr(target, "__all__", [])[:5]:
        assert getattr(module, name) is getattr(target, name)
    with pytest.raises(AttributeError, match="moved to"):
        module.no_such_name  # noqa: B018


def test_renamed_and_retired_names_of_moved_modules():
    for old in ("pyro_osds.potential", "pyro_osds.divergence", "pyro_osds.consistency"):
        sys.modules.pop(old, None)
    with pytest.warns(FutureWarning):
        from pyro_osds.consistency import ConsistencySampler, consistency_function
        from pyro_osds.divergence import slogdet
        from pyro_osds.potential import ModelTarget, SiteInfo
    from pyro_osds.model import ModelTarget as new_model_target
    from pyro_osds.ops.consistency import consistency_function as new_consistency_function
    from pyro_osds.target import Site

    assert SiteInfo is Site and ModelTarget is new_model_target and consistency_function is new_consistency_function
    assert slogdet is torch.linalg.slogdet
    assert ConsistencySampler.__module__ == "pyro_osds.sampler"


@pytest.mark.parametrize("name", ["FlowSampler", "Estimates", "ModelTarget", "PRESETS", "kish_ess", "Draws"])
def test_top_level_names_moved_to_their_modules_warn(name):
    with pytest.warns(FutureWarning, match=f"`pyro_osds.{name}` is deprecated"):
        value = getattr(pyro_osds, name)
    assert value is not None
    with pytest.raises(AttributeError):
        pyro_osds.no_such_name  # noqa: B018


def test_public_names():
    assert sorted(pyro_osds.__all__) == sorted([
        "EvidenceError", "LogEvidence", "OSDS", "OSDSConfig", "TrainingDivergedError", "UnreliableEvidenceWarning",
        "UnsupportedModelError",
        "__version__", "compare", "to_datatree", "to_inference_data"])
    for name in pyro_osds.__all__:
        getattr(pyro_osds, name)


def test_consistency_sampler_is_a_deprecated_flow_sampler():
    from pyro_osds.config import OSDSConfig
    from pyro_osds.sampler import ConsistencySampler, FlowSampler

    config = OSDSConfig.for_method("cdds", grid_size=8, hidden_dim=8)
    with pytest.warns(FutureWarning, match="FlowSampler"):
        sampler = ConsistencySampler(lambda x: (x**2).sum(-1), torch.zeros(2), config)
    assert isinstance(sampler, FlowSampler) and sampler.num_phases == 2
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="method='cdds'"):
        ConsistencySampler(lambda x: (x**2).sum(-1), torch.zeros(2), OSDSConfig())
