# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Runs on a CUDA device when one is present (skipped on CPU-only machines such as CI)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], device=X.device), 1.0).to_event(1))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)


def test_model_with_data_on_the_gpu_trains_and_samples_there():
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g).cuda()
    y = (torch.rand(200, generator=g).cuda() < torch.sigmoid(X @ torch.tensor([1.0, -1.0, 0.5, 0.0]).cuda())).float()
    osds = OSDS(model, num_samples=500, preset="smoke").run(X, y)
    assert osds.samplers[0].device.type == "cuda"
    assert osds.get_samples()["w"].device.type == "cuda"
    ev = osds.log_evidence()
    assert math.isfinite(ev.log_z) and ev.num_folded == 0
    assert osds.to_datatree()["posterior"]["w"].shape == (2, 500, 4)
