# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.consistency: the consistency function's parameterisation, grid and exact log-det."""

import math

import pyro
import pytest
import torch

from pyro_osds import OSDSConfig
from pyro_osds.ops.consistency import consistency_function, consistency_grid, skip_scalings
from pyro_osds.samplers import FlowSampler
from tests.common import D64, batched


def test_consistency_parameterisation():
    c_skip, c_out = skip_scalings(torch.tensor([0.0, 1.0], dtype=D64), 0.5)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x
    assert float(c_skip[1]) == pytest.approx(0.2) and float(c_out[1]) == pytest.approx(0.5 / math.sqrt(1.25))
    assert consistency_grid(128, 18)[:3] == [0, 8, 15] and consistency_grid(128, 18)[-1] == 128
    assert consistency_grid(8, 18) == list(range(9))
    with pytest.raises(ValueError, match="`consistency_points` must be an integer >= 2"):
        consistency_grid(8, 1)


def test_cdds_one_step_log_det_is_exact():
    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("cdds", num_iterations=3, consistency_iterations=3, grid_size=8, dtype=None,
                                   precondition="none")
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    with torch.no_grad():
        for p in sampler.sampling_net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    z0 = torch.randn(4, 3, dtype=D64)
    out = consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process, z0, 8.0,
                               with_volume=True)
    for i in range(4):
        def f(z, i=i):
            return consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process,
                                        z.unsqueeze(0), 8.0).f[0]

        jac = torch.autograd.functional.jacobian(f, z0[i])
        assert float(out.log_abs_det[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)
