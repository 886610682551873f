# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.jacobian: batched Jacobians, exact and Hutchinson traces, potential and score."""

import math

import pytest
import torch

from pyro_osds.ops.integrate import ode_step
from pyro_osds.ops.jacobian import (
    batched_jacobian,
    exact_trace,
    hutchinson_trace,
    potential_and_score,
    potential_score_hessian,
    rademacher,
)
from pyro_osds.ops.reference import ReferenceProcess
from tests.common import D64, DIM, make_potential, random_net


def test_hutchinson_trace_is_unbiased():
    net, potential = random_net(), make_potential()
    process = ReferenceProcess(grid_size=8)
    x0 = torch.randn(3, DIM, dtype=D64)
    step = ode_step(net, potential, process, x0, 8, 4, log_det="none", differentiable=True, langevin_grad=False)
    exact = exact_trace(step.control, step.start)
    probes = rademacher((4000, 3, DIM), dtype=D64)
    _, vjp = hutchinson_trace(step.control, step.start, probes)
    samples = (vjp * probes).sum(-1)  # (probes, batch)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(4000)
    assert bool(((mean - exact).abs() < 4 * se + 1e-12).all())


def test_batched_jacobian_and_trace_match_autograd():
    net = random_net()
    x = torch.randn(5, DIM, dtype=D64, requires_grad=True)
    g = torch.randn(5, DIM, dtype=D64)
    y = net(x, 0.3, 0.5, g)
    jac = batched_jacobian(y, x)
    for i in range(5):
        ref = torch.autograd.functional.jacobian(lambda z, i=i: net(z.unsqueeze(0), 0.3, 0.5, g[i : i + 1])[0], x[i])
        torch.testing.assert_close(jac[i], ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(exact_trace(y, x), jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=0, atol=1e-12)


def test_potential_and_score():
    potential = make_potential()
    x = torch.randn(4, DIM, dtype=D64)
    u, score = potential_and_score(potential, x)
    torch.testing.assert_close(u, potential(x))
    for i in range(4):
        ref = torch.autograd.functional.jacobian(lambda z: potential(z.unsqueeze(0))[0], x[i])
        torch.testing.assert_close(score[i], -ref, rtol=0, atol=1e-12)
    assert not u.requires_grad and not score.requires_grad


@pytest.mark.parametrize("max_rows", [4096, 5])
def test_potential_score_hessian_matches_autograd_at_every_point(max_rows):
    potential = make_potential()
    x = torch.randn(7, DIM, dtype=D64)
    u, score, hessian = potential_score_hessian(potential, x, max_rows=max_rows)  # 5 rows: one point per pass
    torch.testing.assert_close(u, potential(x), rtol=0, atol=1e-12)
    for i in range(x.shape[0]):
        expected = torch.autograd.functional.hessian(lambda v: potential(v.unsqueeze(0))[0], x[i])
        torch.testing.assert_close(hessian[i], expected, rtol=1e-12, atol=1e-12)
        grad = torch.autograd.functional.jacobian(lambda v: potential(v.unsqueeze(0))[0], x[i])
        torch.testing.assert_close(score[i], -grad, rtol=1e-12, atol=1e-12)
