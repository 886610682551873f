# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.lowrank and the one-step map's diagonal-plus-low-rank Jacobian (float64, exact)."""

import math

import pytest
import torch

from pyro_osds.ops import integrate, lowrank
from pyro_osds.ops.integrate import flow, fold_penalty, ode_step
from pyro_osds.ops.losses import flow_kl_loss, path_gradient_direction
from pyro_osds.ops.nets import StepConditionedControl
from pyro_osds.ops.reference import ReferenceProcess
from tests.common import D64

DIM, RANK = 12, 3


def random_factors(batch=6, shared=False, seed=0):
    """Random factors; ``shared``: the diagonal, L and R shared by the batch (only the core per draw)."""
    g = torch.Generator().manual_seed(seed)
    diag = torch.randn(1 if shared else batch, DIM, dtype=D64, generator=g)
    diag = diag + 0.5 * diag.sign()  # entries of both signs, away from zero
    lead = () if shared else (batch,)
    left = torch.randn(*lead, DIM, RANK, dtype=D64, generator=g)
    core = torch.randn(batch, RANK, RANK, dtype=D64, generator=g)
    right = torch.randn(*lead, RANK, DIM, dtype=D64, generator=g)
    return lowrank.DiagPlusLowRank(diag, left, core, right)


@pytest.mark.parametrize("shared", [False, True])
def test_determinant_solves_and_trace_match_the_dense_matrix(shared):
    jac = random_factors(shared=shared)
    dense = lowrank.as_dense(jac)
    assert dense.shape == jac.shape == (6, DIM, DIM) and jac.rank == RANK
    expected = torch.diag_embed(jac.diag.expand(6, DIM)) + jac.left @ jac.core @ jac.right
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-13)
    sign, log_abs = lowrank.slogdet(jac)
    dense_sign, dense_log_abs = torch.linalg.slogdet(dense)
    assert torch.equal(sign, dense_sign) and bool((sign < 0).any()) and bool((sign > 0).any())
    torch.testing.assert_close(log_abs, dense_log_abs, rtol=0, atol=1e-11)
    v = torch.randn(6, DIM, dtype=D64)
    for transpose in (False, True):
        x, ok = lowrank.solve(jac, v, transpose=transpose)
        a = dense.transpose(-1, -2) if transpose else dense
        assert bool(ok.all())
        torch.testing.assert_close((a @ x.unsqueeze(-1)).squeeze(-1), v, rtol=0, atol=1e-10)
        torch.testing.assert_close(lowrank.solve(dense, v, transpose=transpose)[0], x, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lowrank.trace(jac), dense.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(lowrank.as_dense(lowrank.transposed(jac)), dense.transpose(-1, -2), rtol=0, atol=1e-13)
    rows = torch.tensor([True, False, True, False, False, True])
    torch.testing.assert_close(lowrank.as_dense(lowrank.select(jac, rows)), dense[rows], rtol=0, atol=0)
    assert (lowrank.select(jac, rows).left.dim() == 2) == shared  # shared factors stay shared


def test_the_determinant_lemma_is_differentiable_like_slogdet():
    jac = random_factors()
    leaves = [t.clone().requires_grad_(True) for t in jac]
    lowrank.slogdet(lowrank.DiagPlusLowRank(*leaves))[1].sum().backward()
    dense_leaves = [t.clone().requires_grad_(True) for t in jac]
    torch.linalg.slogdet(lowrank.as_dense(lowrank.DiagPlusLowRank(*dense_leaves)))[1].sum().backward()
    for a, b in zip(leaves, dense_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_a_singular_system_gives_nan_rows_not_an_error():
    jac = random_factors(batch=2)
    # row 1: L C R = -diag(d) on the span of e_0 makes J singular
    e = torch.zeros(DIM, dtype=D64)
    e[0] = 1.0
    left, core, right = jac.left.clone(), jac.core.clone(), jac.right.clone()
    left[1], core[1], right[1] = 0.0, 0.0, 0.0
    left[1, :, 0] = -jac.diag[1, 0] * e
    core[1, 0, 0] = 1.0
    right[1, 0] = e
    singular = lowrank.DiagPlusLowRank(jac.diag, left, core, right)
    assert float(lowrank.slogdet(singular)[1][1]) == -float("inf")
    x, ok = lowrank.solve(singular, torch.randn(2, DIM, dtype=D64))
    assert ok.tolist() == [True, False] and bool(torch.isnan(x[1]).all()) and bool(torch.isfinite(x[0]).all())


def test_the_determinants_lu_factors_give_slogdet_its_gradient_and_every_solve():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, DIM, DIM, dtype=D64, generator=gen)
    a[0] = a[0].flip(0)  # pivoting and both signs of the determinant
    a[1] = torch.eye(DIM, dtype=D64).flip(0) if DIM % 4 in (2, 3) else -torch.eye(DIM, dtype=D64)
    leaf, reference_leaf = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    sign, log_abs, factored = lowrank.slogdet_with_factors(leaf)
    expected_sign, expected_log_abs = torch.linalg.slogdet(reference_leaf)
    assert torch.equal(sign, expected_sign) and bool((sign < 0).any()) and bool((sign > 0).any())
    torch.testing.assert_close(log_abs, expected_log_abs, rtol=1e-12, atol=1e-12)
    weights = torch.randn(6, dtype=D64, generator=gen)
    (grad,) = torch.autograd.grad((weights * log_abs).sum(), leaf, retain_graph=True)
    (expected,) = torch.autograd.grad((weights * expected_log_abs).sum(), reference_leaf)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):  # first derivatives only: a second one must not come out silently wrong
        (g,) = torch.autograd.grad(log_abs.sum(), leaf, create_graph=True)
        torch.autograd.grad(g.sum(), leaf)
    v = torch.randn(6, DIM, dtype=D64, generator=gen)
    for jac in (factored, lowrank.transposed(factored)):
        dense = lowrank.as_dense(jac).detach()
        for transpose in (False, True):
            x, ok = lowrank.solve(lowrank.detach(jac), v, transpose=transpose)
            system = dense.transpose(-1, -2) if transpose else dense
            torch.testing.assert_close(x, torch.linalg.solve(system, v), rtol=1e-10, atol=1e-12)
            assert bool(ok.all())
    rows = torch.tensor([True, False, True, False, False, True])
    x, _ = lowrank.solve(lowrank.select(lowrank.transposed(factored), rows), v[rows], transpose=True)
    torch.testing.assert_close(x, torch.linalg.solve(a[rows], v[rows]), rtol=1e-10, atol=1e-12)
    assert torch.equal(lowrank.trace(factored).detach(), a.diagonal(dim1=-2, dim2=-1).sum(-1))
    singular = a.clone()
    singular[2, :, 0] = 0.0
    _, log_abs, factored = lowrank.slogdet_with_factors(singular)
    assert float(log_abs[2]) == -math.inf
    x, ok = lowrank.solve(factored, v)
    assert ok.tolist() == [True, True, False, True, True, True] and not bool(torch.isfinite(x[2]).all())


def wide_net(dim=DIM, hidden=4, seed=0, clip=1e4):
    torch.manual_seed(seed)
    net = StepConditionedControl(dim, hidden_dim=hidden, dtype=D64, outer_clip=clip)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_the_network_factors_are_its_closed_form_jacobian():
    net = wide_net(clip=0.2)  # some outputs clipped: their rows of dh/dx vanish
    x, g, g_jac = (torch.randn(5, DIM, dtype=D64) for _ in range(3))
    g[0, 0] = 1e3  # beyond the inner clip
    u, dense = net.control_and_jacobian(x, 0.7, 0.25, g, g_jac)
    u_f, factors = net.control_and_jacobian_factors(x, 0.7, 0.25, g, g_jac)
    assert net.jacobian_rank == 4 and factors.rank == 4
    torch.testing.assert_close(u_f, u, rtol=0, atol=0)
    torch.testing.assert_close(lowrank.as_dense(factors), dense, rtol=0, atol=1e-14)
    assert bool((u.abs() >= 0.2).any())  # the clip is active somewhere


def one_step_map(net, potential, process, langevin_grad=True):
    def fn(x):
        return flow(net, potential, process, x.unsqueeze(0), 1, log_det="none", differentiable=True,
                    langevin_grad=langevin_grad).x.squeeze(0)

    return fn


def test_the_one_step_map_uses_the_structured_jacobian_and_it_is_exact():
    process = ReferenceProcess(grid_size=16, prior_scale=1.3)
    net = wide_net()

    def potential(x):
        return 0.5 * ((x - 1.0) ** 2).sum(-1) + 0.1 * (x**4).sum(-1)

    assert integrate.prefers_low_rank(net, DIM) and not integrate.prefers_low_rank(net, 4)
    x0 = torch.randn(5, DIM, dtype=D64)
    step = ode_step(net, potential, process, x0, 16, 16, return_jacobian=True)
    assert isinstance(step.jacobian, lowrank.DiagPlusLowRank)
    # only the r x r core is per draw: the determinant and solves cost O(r^3 + D r) each
    assert step.jacobian.diag.shape == (1, DIM) and step.jacobian.left.dim() == step.jacobian.right.dim() == 2
    out = flow(net, potential, process, x0, 1, log_det="exact")
    fn = one_step_map(net, potential, process)
    for i in range(x0.shape[0]):
        jac = torch.autograd.functional.jacobian(fn, x0[i])
        torch.testing.assert_close(lowrank.as_dense(step.jacobian)[i], jac, rtol=0, atol=1e-12)
        sign, log_abs = torch.linalg.slogdet(jac)
        assert float(out.log_abs_det[i]) == pytest.approx(float(log_abs), abs=1e-10)
        assert float(out.orientation[i]) == float(sign)
    # two steps see the target's Hessian after the first: dense there, the same exact log-det
    two = flow(net, potential, process, x0, 2, log_det="exact", return_jacobians=True)
    assert isinstance(two.jacobians[0], lowrank.DiagPlusLowRank) and isinstance(two.jacobians[1], torch.Tensor)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda x: flow(net, potential, process, x.unsqueeze(0), 2, log_det="none", differentiable=True,
                           langevin_grad=True).x.squeeze(0), x0[i])
        _, log_abs = torch.linalg.slogdet(jac)
        assert float(two.log_abs_det[i]) == pytest.approx(float(log_abs), abs=1e-10)
    euler = flow(net, potential, process, x0, 1, log_det="euler_trace").log_abs_det  # the Langevin input held fixed
    frozen = one_step_map(net, potential, process, langevin_grad=False)
    expected = torch.stack([torch.trace(torch.autograd.functional.jacobian(frozen, x0[i])) - DIM for i in range(5)])
    torch.testing.assert_close(euler, expected, rtol=0, atol=1e-10)


def test_a_vanishing_diagonal_falls_back_to_the_dense_matrix():
    process = ReferenceProcess(grid_size=16, prior_scale=1.3)
    net = wide_net()

    def potential(x):
        return 0.5 * (x**2).sum(-1)

    x0 = torch.randn(4, DIM, dtype=D64)
    dt, beta, sigma = 1.0, float(process.beta(16)), float(process.sigma(16))
    # choose the Langevin gain of coordinate 0 so that the step's diagonal vanishes there exactly
    prior_slope = -sigma / process.prior_scale**2
    gain_0 = -(1.0 + 0.5 * dt * beta) / (0.5 * dt * sigma * prior_slope)
    with torch.no_grad():
        net.langevin_gain[-1].weight[0].zero_()
        net.langevin_gain[-1].bias[0] = gain_0
    step = ode_step(net, potential, process, x0, 16, 16, return_jacobian=True)
    assert isinstance(step.jacobian, torch.Tensor)  # not inverted: formed densely
    fn = one_step_map(net, potential, process)
    _, log_abs = torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, x0[0]))
    assert float(step.log_abs_det[0]) == pytest.approx(float(log_abs), abs=1e-9)


def test_path_direction_fold_penalty_and_loss_gradients_are_those_of_the_dense_jacobian(monkeypatch):
    process = ReferenceProcess(grid_size=16, prior_scale=1.3)
    net = wide_net()

    def potential(x):
        return 0.5 * ((x - 1.0) ** 2).sum(-1) + 0.1 * (x**4).sum(-1)

    x0 = torch.randn(40, DIM, dtype=D64, generator=torch.Generator().manual_seed(2))

    def run(gradient):
        net.zero_grad()
        loss = flow_kl_loss(net, potential, process, x0, 1, gradient=gradient).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in net.parameters()]

    def direction():
        x = x0.clone().requires_grad_(True)
        out = flow(net, potential, process, x, 1, log_det="exact", differentiable=True, return_jacobians=True)
        log_w = -potential(out.x) - process.prior_log_prob(x) + out.log_abs_det
        return path_gradient_direction(log_w, x, out.jacobians), out.jacobians[0]

    structured = {g: run(g) for g in ("path", "total")}
    delta, jac = direction()
    assert isinstance(jac, lowrank.DiagPlusLowRank)
    folded_sign = torch.tensor([-1.0, 1.0] * 20, dtype=D64)
    penalty = fold_penalty(jac, folded_sign)
    monkeypatch.setattr(integrate, "prefers_low_rank", lambda net, dim: False)
    dense_delta, dense_jac = direction()
    assert isinstance(dense_jac, lowrank.FactoredDense)  # the dense matrices with their determinant's LU factors
    torch.testing.assert_close(delta, dense_delta, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(penalty, fold_penalty(dense_jac, folded_sign), rtol=1e-9, atol=1e-12)
    assert bool((penalty[::2] > 0).any()) and bool((penalty[1::2] == 0).all())
    for gradient, (value, grads) in structured.items():
        dense_value, dense_grads = run(gradient)
        assert value == pytest.approx(dense_value, abs=1e-10)
        for a, b in zip(grads, dense_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
