# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.losses: the flow KL loss (path gradient, fold penalty) and self-distillation."""

import math

import pytest
import torch

from pyro_osds.ops import lowrank
from pyro_osds.ops.integrate import flow, ode_step
from pyro_osds.ops.inverse import inverse_flow
from pyro_osds.ops.losses import distillation_step_sizes, flow_kl_loss, path_gradient_direction, self_distillation_loss
from pyro_osds.ops.nets import ControlNetwork, StepConditionedControl
from pyro_osds.ops.reference import ReferenceProcess
from tests.common import D64, DIM, make_potential, quadratic, random_net


@pytest.mark.parametrize("num_steps", [1, 2])
def test_log_weights_gradient_at_the_flows_output_is_minus_the_targets_gradient(num_steps):
    # what lets the path gradient's cutoff take the target's score from the same backward pass as grad_x0 log w:
    # log w = -U(x_K) - log p0(x0) + log|det|, and the log-det depends on x0 (and the earlier states) only
    process = ReferenceProcess(grid_size=16, prior_scale=1.2)
    net, potential = random_net(scale=0.03), make_potential(scale=0.3)
    x0 = (0.5 * torch.randn(5, DIM, dtype=D64, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    out = flow(net, potential, process, x0, num_steps, log_det="exact", differentiable=True, return_jacobians=True)
    log_w = -potential(out.x) - process.prior_log_prob(x0) + out.log_abs_det
    grad_x0, grad_xk = torch.autograd.grad(log_w.sum(), [x0, out.x], retain_graph=True)
    y = out.x.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(-potential(y).sum(), y)
    torch.testing.assert_close(grad_xk, score, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path_gradient_direction(log_w, x0, out.jacobians, grad=grad_x0),
                               path_gradient_direction(log_w, x0, out.jacobians), rtol=0, atol=0)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_path_direction_is_the_difference_of_target_and_flow_scores(num_steps):
    # delta = grad log pi(x) - grad log q(x) at x = F(x0); grad log q by central differences of the
    # density of the forward map, log q(y) = log p0(F^{-1}(y)) - log|det dF|, through the exact inverse
    process = ReferenceProcess(grid_size=16, prior_scale=1.2)
    net, potential = random_net(scale=0.03), make_potential(scale=0.3)
    x0 = 0.5 * torch.randn(5, DIM, dtype=D64, generator=torch.Generator().manual_seed(1))
    x0.requires_grad_(True)
    out = flow(net, potential, process, x0, num_steps, log_det="exact", differentiable=True, return_jacobians=True)
    # every step orientation-preserving: the map is injective there and q(y) is its density
    assert len(out.jacobians) == num_steps
    assert all(bool((torch.linalg.det(lowrank.as_dense(jac)) > 0).all()) for jac in out.jacobians)
    log_w = -potential(out.x) - process.prior_log_prob(x0) + out.log_abs_det
    delta = path_gradient_direction(log_w, x0, out.jacobians)

    def log_q(y):
        inv = inverse_flow(net, potential, process, y, num_steps)
        assert bool(inv.converged.all())
        return process.prior_log_prob(inv.x0) - inv.log_abs_det

    y = out.x.detach()
    eps = 1e-4
    score_q = torch.stack([(log_q(y + eps * e) - log_q(y - eps * e)) / (2 * eps)
                           for e in torch.eye(DIM, dtype=D64)], dim=-1)
    y_grad = y.clone().requires_grad_(True)
    (score_pi,) = torch.autograd.grad(-potential(y_grad).sum(), y_grad)
    torch.testing.assert_close(delta, score_pi - score_q, rtol=1e-5, atol=1e-5)
    # restricted to some rows, the same rows
    rows = torch.tensor([True, False, True, True, False])
    torch.testing.assert_close(path_gradient_direction(log_w, x0, out.jacobians, rows), delta[rows])


class _LinearControl(ControlNetwork):
    """u = a x: the one-step map is x1 = s x0 with s = 1 + beta/2 + sigma a / 2, so q = N(0, (s sigma0)^2)."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=D64))

    def forward(self, x, t, d, g):
        return self.a * x


def _linear_case(s_target, a):
    process = ReferenceProcess(grid_size=4, prior_scale=0.8)
    beta, sigma = float(process.beta(4)), float(process.sigma(4))
    net = _LinearControl(a)
    slope = 1.0 + 0.5 * beta + 0.5 * sigma * a
    var = (s_target * process.prior_scale) ** 2

    def potential(x):
        return 0.5 * (x**2).sum(-1) / var

    # KL(N(0, (s sigma0)^2 I) || N(0, (s0 sigma0)^2 I)) = D (s^2 / (2 s0^2) - log s) + const, and ds/da = sigma / 2
    exact_grad = 3 * (slope / s_target**2 - 1.0 / slope) * 0.5 * sigma
    return process, net, potential, exact_grad


def _batch_gradients(gradient, process, net, potential, num_batches=200, batch=50):
    gen = torch.Generator().manual_seed(7)
    grads = []
    for _ in range(num_batches):
        x0 = process.sample_prior(batch, 3, dtype=D64, generator=gen)
        loss = flow_kl_loss(net, potential, process, x0, 1, gradient=gradient, path_cutoff=None).loss
        (g,) = torch.autograd.grad(loss, net.a)
        grads.append(float(g))
    return torch.tensor(grads, dtype=D64)


@pytest.mark.parametrize("gradient", ["path", "total"])
def test_both_estimators_are_unbiased_for_the_reverse_kl_gradient(gradient):
    process, net, potential, exact_grad = _linear_case(s_target=1.5, a=0.02)
    grads = _batch_gradients(gradient, process, net, potential)
    se = float(grads.std()) / math.sqrt(len(grads))
    assert abs(float(grads.mean()) - exact_grad) < 4.0 * se, (float(grads.mean()), exact_grad, se)
    assert abs(exact_grad) > 10 * se  # the test has power: the gradient is far from zero


def test_path_gradient_vanishes_at_the_optimum_where_the_total_gradient_is_noise():
    process = ReferenceProcess(grid_size=4, prior_scale=0.8)
    a = 0.1
    slope = 1.0 + 0.5 * float(process.beta(4)) + 0.5 * float(process.sigma(4)) * a
    process, net, potential, exact_grad = _linear_case(s_target=slope, a=a)  # q = pi exactly
    assert abs(exact_grad) < 1e-12
    path = _batch_gradients("path", process, net, potential, num_batches=5)
    total = _batch_gradients("total", process, net, potential, num_batches=5)
    assert float(path.abs().max()) < 1e-10
    assert float(total.abs().min()) > 1e-4  # per-batch score-term noise


def _flat_grad(loss, net):
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def test_outlying_draws_fall_back_to_the_total_gradient_and_the_value_is_the_kl():
    process = ReferenceProcess(grid_size=8)
    net, potential = random_net(scale=0.03), make_potential(scale=0.3)
    x0 = torch.randn(64, DIM, dtype=D64, generator=torch.Generator().manual_seed(2))
    total = flow_kl_loss(net, potential, process, x0, 1, gradient="total")
    assert total.num_folded == 0
    # the cutoff is in units of the target score's median norm; put it at the median direction norm
    x0_ = x0.detach().requires_grad_(True)
    out = flow(net, potential, process, x0_, 1, log_det="exact", differentiable=True, return_jacobians=True)
    log_w = -potential(out.x) - process.prior_log_prob(x0_) + out.log_abs_det
    delta = path_gradient_direction(log_w, x0_, out.jacobians)
    y = out.x.detach().requires_grad_(True)
    (score,) = torch.autograd.grad(-potential(y).sum(), y)
    norms, scale = delta.norm(dim=-1), score.norm(dim=-1).median()
    cutoff = float(norms.median() / scale) * (1 + 1e-9)
    back = norms > cutoff * scale
    assert 0 < int(back.sum()) < 64

    path = flow_kl_loss(net, potential, process, x0, 1, gradient="path", path_cutoff=None)
    half = flow_kl_loss(net, potential, process, x0, 1, gradient="path", path_cutoff=cutoff)
    every = flow_kl_loss(net, potential, process, x0, 1, gradient="path", path_cutoff=1e-12)
    # the value is the reverse-KL estimate whichever estimator differentiates it
    for loss in (path, half, every):
        torch.testing.assert_close(loss.loss.detach(), total.loss.detach())
    g_total, g_path = _flat_grad(total.loss, net), _flat_grad(path.loss, net)
    g_half, g_every = _flat_grad(half.loss, net), _flat_grad(every.loss, net)
    # a cutoff below every draw's norm: all draws fall back, the total gradient exactly
    torch.testing.assert_close(g_every, g_total)
    # about half the draws fall back: neither estimator alone, but path on the kept draws plus total on the rest
    assert not torch.allclose(g_half, g_path) and not torch.allclose(g_half, g_total)
    expected = -((delta * out.x).sum(-1)[~back].sum() + log_w[back].sum()) / 64
    torch.testing.assert_close(g_half, _flat_grad(expected, net))
    with pytest.raises(ValueError, match="gradient"):
        flow_kl_loss(net, potential, process, x0, 1, gradient="score")


def test_distillation_step_sizes():
    assert distillation_step_sizes(128) == [2, 4, 8, 16, 32, 64, 128]
    assert distillation_step_sizes(12) == [2, 4]
    assert distillation_step_sizes(7) == []


def test_self_distillation_loss_is_zero_for_a_consistent_teacher():
    # with the network at its initialisation (u = g) teacher == student, but one large Euler step
    # differs from two half steps, so the state term is positive; with equal nets and a linear map
    # it still vanishes only for d -> 0. Here we check the terms are finite and the gradient flows.
    torch.manual_seed(0)
    net = StepConditionedControl(3, hidden_dim=8, dtype=D64)
    process = ReferenceProcess(grid_size=8)
    states = torch.randn(9, 5, 3, dtype=D64)
    out = self_distillation_loss(net, net, quadratic, process, states, generator=torch.Generator().manual_seed(0))
    assert out.num_invalid == 0 and out.state > 0 and math.isfinite(out.volume)
    out.loss.backward()
    assert all(p.grad is not None for p in net.state_net.parameters())


class _CubicControl(ControlNetwork):
    """u = a x + b x^3: the one-step map's derivative (1 + beta/2) + (sigma/2)(a + 3 b x^2) can change sign."""

    def __init__(self, a, b):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, t, d, g):
        return self.a * x + self.b * x**3


def test_flow_kl_loss_replaces_folded_draws_by_the_fold_penalty():
    process = ReferenceProcess(grid_size=4)
    beta, sigma = float(process.beta(4)), float(process.sigma(4))
    c = 1.0 + 0.5 * beta
    # one step (dt = 1): F'(x) = c (x^2 - 1), folded for |x| < 1
    net = _CubicControl(-4.0 * c / sigma, 2.0 * c / (3.0 * sigma))

    def potential(x):
        return 0.5 * (x**2).sum(-1)

    x0 = torch.linspace(-2.5, 2.5, 40, dtype=torch.float64).unsqueeze(-1)
    x = x0.squeeze(-1)
    slope = c + 0.5 * sigma * (net.a + 3.0 * net.b * x**2)  # = c (x^2 - 1), with its graph to a and b
    folded = (slope < 0).detach()
    assert 0 < int(folded.sum()) < 40
    x1 = x + 0.5 * sigma * (net.a * x + net.b * x**3) + 0.5 * beta * x
    log_w = -0.5 * x1**2 - process.prior_log_prob(x0) + torch.log(slope.abs())
    kl_part = -log_w[~folded].mean()
    penalty_part = 2.0 * (-slope[folded]).sum() / 40

    out = flow_kl_loss(net, potential, process, x0, 1, fold_weight=2.0)
    assert out.num_folded == int(folded.sum()) and out.num_invalid == 0
    torch.testing.assert_close(out.loss, (kl_part + penalty_part).detach())
    torch.testing.assert_close(out.log_weights, log_w.detach())
    grads = torch.autograd.grad(out.loss, [net.a, net.b])
    expected = torch.autograd.grad(kl_part + penalty_part, [net.a, net.b], retain_graph=True)
    torch.testing.assert_close(grads, expected)
    # the penalty's own gradient unfolds: descending it raises the negative slopes
    (penalty_grad_a,) = torch.autograd.grad(penalty_part, net.a)
    assert float(penalty_grad_a) < 0
    # only folded draws: nothing left to average, the batch trains on the penalty alone
    only = flow_kl_loss(net, potential, process, x0[folded], 1, fold_weight=2.0)
    torch.testing.assert_close(only.loss, (2.0 * (-slope[folded]).sum() / int(folded.sum())).detach())
    # fold_weight=0: folded draws stay in the mean, as without the penalty
    plain = flow_kl_loss(net, potential, process, x0, 1, fold_weight=0.0)
    torch.testing.assert_close(plain.loss, -log_w.mean().detach())


def test_flow_kl_loss_counts_draws_that_fold_in_two_steps():
    # Two folding steps give a positive orientation; such draws still fold and must be penalised.
    process = ReferenceProcess(grid_size=4)
    net = _CubicControl(-20.0, 0.5)

    def potential(x):
        return 0.5 * (x**2).sum(-1)

    x0 = torch.linspace(-2.5, 2.5, 40, dtype=torch.float64).unsqueeze(-1)
    first = ode_step(net, potential, process, x0, 4, 2, log_det="exact")
    second = ode_step(net, potential, process, first.x, 2, 2, log_det="exact")
    any_fold = (first.sign < 0) | (second.sign < 0)
    both = (first.sign < 0) & (second.sign < 0)
    assert int(both.sum()) > 0  # the case the orientation alone misses
    out = flow_kl_loss(net, potential, process, x0, 2)
    assert out.num_folded == int(any_fold.sum())
    only_orientation = flow_kl_loss(net, potential, process, x0, 2, fold_weight=0.0)
    assert only_orientation.num_folded == int(((first.sign * second.sign) < 0).sum())


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("gradient", ["path", "total"])
def test_the_static_loss_is_the_selecting_losss_value_and_gradient(gradient):
    # masked instead of selected (a GPU's training, which must not read the device): the same loss and gradient on a
    # batch with folded draws, a draw whose potential is not finite and, for the path estimator, draws that fall back
    # to the total gradient under a tight cutoff
    process = ReferenceProcess(grid_size=4)
    net = _CubicControl(-4.0 * (1 + 0.5 * float(process.beta(4))) / float(process.sigma(4)), 0.9)

    def potential(x):  # not finite above 2.3: that draw is excluded
        return torch.where(x[..., 0] > 2.3, torch.full_like(x[..., 0], math.inf), 0.5 * (x**2).sum(-1))

    x0 = torch.linspace(-2.5, 2.5, 41, dtype=torch.float64).unsqueeze(-1)
    params, by_cutoff = [net.a, net.b], {}
    for cutoff in (5.0, 0.5, None):
        selecting = flow_kl_loss(net, potential, process, x0, 1, gradient=gradient, path_cutoff=cutoff)
        static = flow_kl_loss(net, potential, process, x0, 1, gradient=gradient, path_cutoff=cutoff, static=True)
        assert int(selecting.num_folded) > 0 and int(selecting.num_invalid) > 0
        assert int(static.num_folded) == selecting.num_folded and int(static.num_invalid) == selecting.num_invalid
        torch.testing.assert_close(static.loss, selecting.loss, rtol=1e-12, atol=1e-12)
        by_cutoff[cutoff] = _grads(static.loss, params)
        torch.testing.assert_close(by_cutoff[cutoff], _grads(selecting.loss, params), rtol=1e-12, atol=0)
        torch.testing.assert_close(static.log_weights, selecting.log_weights, rtol=0, atol=0, equal_nan=True)
    if gradient == "path":  # the tight cutoff sent draws to the total gradient
        assert not torch.allclose(by_cutoff[0.5][0], by_cutoff[None][0])
    # nothing to train on (one usable draw, none folded): None when selecting, NaN (a skipped step) when static
    one = x0[[0]]
    assert flow_kl_loss(net, potential, process, one, 1, gradient=gradient).loss is None
    assert math.isnan(float(flow_kl_loss(net, potential, process, one, 1, gradient=gradient, static=True).loss.detach()))
    # folded draws alone: the penalty alone, either way
    folded_only = x0[19:22]
    torch.testing.assert_close(flow_kl_loss(net, potential, process, folded_only, 1, static=True).loss,
                               flow_kl_loss(net, potential, process, folded_only, 1).loss)
