# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.integrate: the K-step flow and its exact log-determinant, its inverse, EM paths, folds."""

import math

import pytest
import torch

from pyro_osds.ops.em import em_rollout
from pyro_osds.ops.integrate import count_folded, flow, fold_penalty, langevin_input, ode_step
from pyro_osds.ops.inverse import inverse_flow
from pyro_osds.ops.jacobian import batched_jacobian, exact_trace, potential_and_score
from pyro_osds.ops.nets import ControlNetwork
from pyro_osds.ops.reference import ReferenceProcess
from tests.common import D64, DIM, make_potential, random_net


def single_map(net, potential, process, num_steps, langevin_grad=True):
    def fn(x):
        out = flow(net, potential, process, x.unsqueeze(0), num_steps, log_det="none", differentiable=True,
                   langevin_grad=langevin_grad)
        return out.x.squeeze(0)

    return fn


@pytest.mark.parametrize("langevin_time", ["start", "end"])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_exact_log_det_equals_slogdet_of_whole_map(num_steps, langevin_time):
    process = ReferenceProcess(grid_size=16, prior_scale=1.3, langevin_time=langevin_time)
    net, potential = random_net(), make_potential()
    x0 = torch.randn(6, DIM, dtype=D64)
    out = flow(net, potential, process, x0, num_steps, log_det="exact")
    fn = single_map(net, potential, process, num_steps)
    for i in range(x0.shape[0]):
        jac = torch.autograd.functional.jacobian(fn, x0[i])
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert float(out.log_abs_det[i]) == pytest.approx(float(logabsdet), abs=1e-8)
        assert float(out.orientation[i]) == float(sign)
        torch.testing.assert_close(out.x[i], fn(x0[i]), rtol=0, atol=1e-12)


def test_exact_log_det_includes_the_langevin_hessian_term():
    process = ReferenceProcess(grid_size=16)
    net, potential = random_net(), make_potential()
    x0 = torch.randn(6, DIM, dtype=D64)
    exact = flow(net, potential, process, x0, 2, log_det="exact").log_abs_det
    frozen = flow(net, potential, process, x0, 2, log_det="exact_frozen_langevin").log_abs_det
    fn = single_map(net, potential, process, 2, langevin_grad=False)
    for i in range(x0.shape[0]):
        _, logabsdet = torch.linalg.slogdet(torch.autograd.functional.jacobian(fn, x0[i]))
        assert float(frozen[i]) == pytest.approx(float(logabsdet), abs=1e-8)
    # the Hessian term is not negligible (the authors' code drops it)
    assert float((exact - frozen).abs().max()) > 1e-2


def test_euler_trace_formula_and_its_first_order_agreement_with_the_exact_log_det():
    process = ReferenceProcess(grid_size=64)
    net, potential = random_net(scale=0.1), make_potential()
    x0 = torch.randn(5, DIM, dtype=D64)
    step = ode_step(net, potential, process, x0, 64, 16, log_det="euler_trace")
    u = ode_step(net, potential, process, x0, 64, 16, log_det="none", differentiable=True, langevin_grad=False)
    trace = exact_trace(u.control, u.start)
    expected = 0.25 * (0.5 * process.beta(64.0) * DIM + 0.5 * process.sigma(64.0) * trace)
    torch.testing.assert_close(step.log_abs_det, expected, rtol=0, atol=1e-12)
    # log det(I + dt A) - dt tr A = O(dt^2) per step: the gap over the whole flow shrinks like 1/K
    gaps = []
    for k in [8, 16, 32, 64]:
        ex = flow(net, potential, process, x0, k, log_det="exact_frozen_langevin").log_abs_det
        tr = flow(net, potential, process, x0, k, log_det="euler_trace").log_abs_det
        gaps.append(float((ex - tr).abs().mean()))
    orders = [math.log2(gaps[i] / gaps[i + 1]) for i in range(len(gaps) - 1)]
    assert all(0.8 < o < 1.2 for o in orders), orders


class LinearControl(ControlNetwork):
    """u = a x, ignoring time, step and Langevin input: the PF drift is lambda(c) x."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, d, g, *, features=None):
        return self.a * x


def test_linear_velocity_field_closed_form_and_convergence_order():
    a = -0.7
    process = ReferenceProcess(grid_size=512, prior_scale=1.5)
    net = LinearControl(a)
    potential = make_potential()  # irrelevant to this control, but the Langevin input is still computed
    x0 = torch.randn(5, DIM, dtype=D64)

    def rate(code):  # lambda(c) = sigma(c) a / 2 + beta(c) / 2
        return 0.5 * process.sigma(code) * a + 0.5 * process.beta(code)

    errors = []
    tau = torch.linspace(0, 1, 400_001, dtype=D64)
    continuous = float(torch.trapezoid(0.5 * process.sigma(tau * 512) * a + 0.5 * process.beta(tau * 512), tau))
    for k in [8, 16, 32, 64, 128]:
        out = flow(net, potential, process, x0, k, log_det="exact")
        d = 512 // k
        factors = [1 + (d / 512) * rate(float(512 - j * d)) for j in range(k)]
        prod = math.prod(factors)
        torch.testing.assert_close(out.x, prod * x0, rtol=1e-12, atol=1e-12)
        expected_log_det = DIM * sum(math.log(abs(f)) for f in factors)
        assert float(out.log_abs_det.max()) == pytest.approx(expected_log_det, abs=1e-10)
        assert float(out.log_abs_det.min()) == pytest.approx(expected_log_det, abs=1e-10)
        errors.append(abs(math.log(abs(prod)) - continuous))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)]
    assert all(abs(o - 1.0) < 0.2 for o in orders), orders


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_inverse_flow_round_trip(num_steps):
    process = ReferenceProcess(grid_size=16)
    # a soft target: large Langevin steps on a stiff one fold the untrained map
    net, potential = random_net(scale=0.03), make_potential(scale=0.3)
    x0 = torch.randn(8, DIM, dtype=D64)
    fwd = flow(net, potential, process, x0, num_steps, log_det="exact")
    assert not bool(count_folded(fwd.orientation).any())  # an injective map: a unique preimage
    inv = inverse_flow(net, potential, process, fwd.x, num_steps)
    assert bool(inv.converged.all())
    torch.testing.assert_close(inv.x0, x0, rtol=0, atol=1e-8)
    torch.testing.assert_close(inv.log_abs_det, fwd.log_abs_det, rtol=0, atol=1e-8)
    torch.testing.assert_close(inv.orientation, fwd.orientation)


def test_em_kernels_match_torch_distributions():
    process = ReferenceProcess(grid_size=8, prior_scale=0.7)
    net, potential = random_net(), make_potential()
    x0 = process.sample_prior(6, DIM, dtype=D64)
    gen = torch.Generator().manual_seed(5)
    path = em_rollout(net, potential, process, x0, 2, generator=gen)
    assert path.states.shape == (3, 6, DIM)
    log_f = torch.zeros(6, dtype=D64)
    log_b = torch.zeros(6, dtype=D64)
    dt = 0.5
    for k, code in enumerate([8.0, 4.0]):
        x, x_next = path.states[k], path.states[k + 1]
        _, score = potential_and_score(potential, x)
        g = langevin_input(process, x, code, score)
        u = net(x, code / 8, dt, g)
        beta = torch.tensor(process.beta(code), dtype=D64)
        std = torch.tensor(process.sigma(code) * math.sqrt(dt), dtype=D64)
        fwd = torch.distributions.Normal(x + dt * (process.sigma(code) * u + 0.5 * beta * x), std)
        bwd = torch.distributions.Normal((1 - 0.5 * beta * dt) * x_next, std)
        log_f = log_f + fwd.log_prob(x_next).sum(-1)
        log_b = log_b + bwd.log_prob(x).sum(-1)
    torch.testing.assert_close(path.log_forward, log_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(path.log_backward, log_b, rtol=0, atol=1e-10)
    # evaluating along the same fixed states reproduces the sampled path's densities
    again = em_rollout(net, potential, process, x0, 2, states=path.states)
    torch.testing.assert_close(again.log_forward, path.log_forward, rtol=0, atol=1e-10)
    torch.testing.assert_close(again.log_backward, path.log_backward, rtol=0, atol=1e-10)


def test_em_rollout_is_reparameterised():
    process = ReferenceProcess(grid_size=4)
    net, potential = random_net(), make_potential()
    x0 = torch.randn(3, DIM, dtype=D64)
    path = em_rollout(net, potential, process, x0, 4, differentiable=True, generator=torch.Generator().manual_seed(0))
    path.states[-1].sum().backward()
    assert all(p.grad is not None for p in net.state_net.parameters())


def test_langevin_time_end_feeds_the_target_score_to_one_step_maps():
    start, end = ReferenceProcess(grid_size=8), ReferenceProcess(grid_size=8, langevin_time="end")
    x, score = torch.randn(3, DIM, dtype=D64), torch.randn(3, DIM, dtype=D64)
    sigma = start.sigma(8.0)
    torch.testing.assert_close(langevin_input(start, x, 8.0, score, 8.0), sigma * start.prior_score(x))
    torch.testing.assert_close(langevin_input(end, x, 8.0, score, 8.0), sigma * score)
    # on a fine step the two differ by O(1/T)
    diff = langevin_input(end, x, 4.0, score, 1.0) - langevin_input(start, x, 4.0, score, 1.0)
    torch.testing.assert_close(diff, start.sigma(4.0) / 8 * (score - start.prior_score(x)))


def test_count_folded_uses_the_majority_orientation():
    assert count_folded(None) is None
    all_negative = torch.tensor([-1.0, -1.0, -1.0])
    assert not bool(count_folded(all_negative).any())  # a reflection is a bijection
    mixed = torch.tensor([1.0, 1.0, -1.0, 0.0])
    assert count_folded(mixed).tolist() == [False, False, True, True]


def test_invalid_log_det_method():
    with pytest.raises(ValueError, match="log_det"):
        flow(random_net(), make_potential(), ReferenceProcess(grid_size=4), torch.zeros(1, DIM, dtype=D64), 1,
             log_det="jacobian")
    with pytest.raises(ValueError, match="exact_frozen_langevin"):
        ode_step(random_net(), make_potential(), ReferenceProcess(grid_size=4), torch.zeros(1, DIM, dtype=D64), 4, 4,
                 log_det="exact", langevin_grad=False)


def test_fold_penalty_is_the_negative_smallest_symmetric_eigenvalue_on_folded_draws_only():
    g = torch.Generator().manual_seed(5)
    jac = torch.randn(64, 3, 3, dtype=D64, generator=g)
    sign, _ = torch.linalg.slogdet(jac)
    assert bool((sign < 0).any()) and bool((sign > 0).any())
    penalty = fold_penalty(jac, sign)
    smallest = torch.linalg.eigvalsh(0.5 * (jac + jac.transpose(-1, -2)))[:, 0]
    expected = torch.where(sign < 0, -smallest, torch.zeros_like(smallest))
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=1e-12)
    # a negative determinant forces a negative symmetric eigenvalue: every folded draw pays
    assert bool((penalty[sign < 0] > 0).all())
    # the transpose gives the same penalty
    torch.testing.assert_close(fold_penalty(jac.transpose(-1, -2), sign), penalty, rtol=1e-12, atol=1e-12)


def test_flow_fold_penalty_sums_the_steps_penalties():
    process = ReferenceProcess(grid_size=8)
    net, potential = random_net(scale=0.05), make_potential()
    x0 = process.sample_prior(32, DIM, dtype=D64, generator=torch.Generator().manual_seed(0))
    out = flow(net, potential, process, x0, 2, log_det="exact", with_fold_penalty=True)
    expected, x = torch.zeros(32, dtype=D64), x0
    for code in (8, 4):
        step = ode_step(net, potential, process, x, code, 4, log_det="exact", return_jacobian=True)
        # dx_next/dx, rows are outputs (what the path gradient's solves need)
        torch.testing.assert_close(step.jacobian, batched_jacobian_of_step(net, potential, process, x, code))
        penalty = fold_penalty(step.jacobian, step.sign)
        # exactly the draws this step folds pay (this random network folds some in its second step)
        assert torch.equal(penalty > 0, step.sign < 0)
        expected, x = expected + penalty, step.x
    assert bool((out.orientation < 0).any())
    torch.testing.assert_close(out.fold_penalty, expected)
    plain = flow(net, potential, process, x0, 2, log_det="exact")
    assert plain.fold_penalty is None
    torch.testing.assert_close(out.log_abs_det, plain.log_abs_det)
    with pytest.raises(ValueError, match="return_jacobian"):
        ode_step(net, potential, process, x0, 8, 4, log_det="hutchinson", return_jacobian=True)


def batched_jacobian_of_step(net, potential, process, x, code):
    x = x.detach().requires_grad_(True)
    out = ode_step(net, potential, process, x, code, 4, log_det="none", langevin_grad=True, differentiable=True)
    return batched_jacobian(out.x, x).detach()
