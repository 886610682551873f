# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.tails: the two-sided sinh-arcsinh transform, the tail-adaptive affine map and its fit."""

import math

import pytest
import torch

from pyro_osds.ops.affine import AffineMap, preconditioner_from_state, whiten_potential
from pyro_osds.ops.precondition import fit_gaussian_starts, fit_laplace, fit_tails, gaussian_elbo
from pyro_osds.ops.tails import MAX_TAIL, TailAffineMap, tail_from_parameter, tail_inverse, tail_transform
from tests.common import D64


def random_map(dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tril(torch.randn(dim, dim, dtype=D64, generator=g)) + 2.5 * torch.eye(dim, dtype=D64)
    left = torch.exp(torch.randn(dim, dtype=D64, generator=g) * 0.5)
    right = torch.exp(torch.randn(dim, dtype=D64, generator=g) * 0.5)
    return TailAffineMap(torch.randn(dim, dtype=D64, generator=g), scale, left, right)


def test_transform_slope_matches_autograd_and_inverse_round_trips():
    g = torch.Generator().manual_seed(1)
    y = 3.0 * torch.randn(200, 3, dtype=D64, generator=g)
    left, right = torch.tensor([0.3, 1.0, 2.5], dtype=D64), torch.tensor([1.7, 0.6, 1.0], dtype=D64)
    x, log_slope = tail_transform(y, left, right)
    slope = torch.func.vmap(torch.func.jacrev(lambda v: tail_transform(v[None], left, right)[0][0]))(y)
    torch.testing.assert_close(log_slope, torch.diagonal(slope, dim1=-2, dim2=-1).log(), rtol=0, atol=1e-12)
    torch.testing.assert_close(tail_inverse(x, left, right), y, rtol=1e-12, atol=1e-12)
    assert bool((torch.sign(x) == torch.sign(y)).all())  # each side maps onto its own half-line


def test_transform_is_the_identity_at_gaussian_tails_and_twice_differentiable_at_zero():
    y = torch.linspace(-6, 6, 101, dtype=D64)[:, None]
    one = torch.ones(1, dtype=D64)
    x, log_slope = tail_transform(y, one, one)
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_slope, torch.zeros_like(y), rtol=0, atol=1e-12)

    def second_derivative(v, delta):  # d2g/dy2 of one side, by double autograd
        v = torch.tensor([[v]], dtype=D64, requires_grad=True)
        d = torch.tensor([delta], dtype=D64)
        (first,) = torch.autograd.grad(tail_transform(v, d, d)[0].sum(), v, create_graph=True)
        return float(torch.autograd.grad(first.sum(), v)[0])

    # both sides are odd: value 0, slope 1, curvature 0 at the origin, whatever the tails
    for delta in (0.25, 0.7, 3.0):
        assert second_derivative(1e-9, delta) == pytest.approx(0.0, abs=1e-7)
        assert second_derivative(-1e-9, delta) == pytest.approx(0.0, abs=1e-7)
    # and a heavy tail is heavier: g(6) grows as 6**(1/delta)
    heavy, _ = tail_transform(torch.full((1, 1), 6.0, dtype=D64), torch.tensor([0.5], dtype=D64),
                              torch.tensor([0.5], dtype=D64))
    assert float(heavy) > 30.0


def test_tail_parameter_is_bounded_and_the_identity_at_zero():
    theta = torch.linspace(-50, 50, 201, dtype=D64)
    delta = tail_from_parameter(theta)
    assert float(delta.min()) > 1 / MAX_TAIL - 1e-9 and float(delta.max()) < MAX_TAIL + 1e-9
    assert float(tail_from_parameter(torch.zeros(1, dtype=D64))) == 1.0
    assert bool((delta[1:] >= delta[:-1]).all())  # increasing (flat only where tanh saturates)


def test_map_log_det_matches_slogdet_and_round_trips():
    pre = random_map()
    g = torch.Generator().manual_seed(2)
    y = 2.0 * torch.randn(7, 4, dtype=D64, generator=g)
    x, log_abs_det = pre.forward_and_log_abs_det(y)
    jac = torch.func.vmap(torch.func.jacrev(lambda v: pre(v[None])[0]))(y)
    torch.testing.assert_close(log_abs_det, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-11)
    torch.testing.assert_close(pre.inverse(x), y, rtol=1e-10, atol=1e-10)
    restored = preconditioner_from_state(pre.state(), dtype=torch.float32)
    assert isinstance(restored, TailAffineMap) and restored.left.dtype == torch.float32
    torch.testing.assert_close(restored.to(dtype=D64).right, pre.right)


def test_whitened_potential_keeps_the_normaliser():
    # a Gaussian target pulled back through a tail map: the integral of exp(-U_z) is still the target's Z
    pre = random_map(dim=2, seed=3)
    pre = pre._replace(left=pre.left.clamp(min=0.7), right=pre.right.clamp(min=0.7))
    whitened = whiten_potential(lambda x: 0.5 * (x * x).sum(-1) + 1.0, pre)
    z = torch.randn(400_000, 2, dtype=D64, generator=torch.Generator().manual_seed(4))
    lw = -whitened(z) + 0.5 * (z * z).sum(-1) + math.log(2 * math.pi)
    est = float(torch.logsumexp(lw, 0)) - math.log(z.shape[0])
    assert est == pytest.approx(math.log(2 * math.pi) - 1.0, abs=0.02)


def log_gamma_product(shapes, rate=2.0):
    """A product of log-Gamma posteriors: u_i = log lambda_i, lambda_i ~ Gamma(k_i, rate), exact log Z."""
    k = torch.as_tensor(shapes, dtype=D64)

    def potential(u):
        return -(k * u - rate * u.exp()).sum(-1)

    return potential, float((torch.lgamma(k) - k * math.log(rate)).sum())


def test_fitted_tails_close_most_of_the_gaussian_gap_on_skewed_marginals():
    # skewed marginals: the left tail exponential, the right doubly exponential. The best Gaussian's KL is
    # sum_i KL_i (0.08, 0.04, 0.028 nats at shapes 1, 2, 3 per coordinate, 1-D fits by L-BFGS); two tails per
    # coordinate take it below a tenth (1-D: 0.001, 0.0004, 0.0003)
    shapes = [1.0, 2.0, 3.0] * 4
    potential, log_z = log_gamma_product(shapes)
    laplace, _ = fit_laplace(potential, torch.zeros(len(shapes), dtype=D64))
    gauss, _ = fit_gaussian_starts(potential, [laplace], generator=torch.Generator().manual_seed(0))
    tails, info = fit_tails(potential, gauss, generator=torch.Generator().manual_seed(1))
    assert isinstance(tails, TailAffineMap) and isinstance(gauss, AffineMap)
    assert info["tails_elbo"] > info["gaussian_elbo"]
    gap_gauss = log_z - float(gaussian_elbo(potential, gauss, 20_000, generator=torch.Generator().manual_seed(5)))
    gap_tails = log_z - float(gaussian_elbo(potential, tails, 20_000, generator=torch.Generator().manual_seed(5)))
    assert 0.45 < gap_gauss < 0.75  # 4 x (0.08 + 0.04 + 0.028) = 0.59 at the best Gaussian
    assert 0 < gap_tails < 0.1 * gap_gauss
    # the fitted left tails are heavier than Gaussian, the right ones lighter (the Gaussian's scale is diagonal)
    assert bool((tails.left < 1).all()) and bool((tails.right > 1).all())


def test_tails_stay_gaussian_where_the_target_is_gaussian():
    # a correlated Gaussian: the tails fit cannot beat the exact Gaussian, so the Gaussian is kept (or tails
    # within noise of 1)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, dtype=D64, generator=g)
    cov = a @ a.T + 0.5 * torch.eye(5, dtype=D64)
    prec = torch.linalg.inv(cov)
    exact = AffineMap(torch.ones(5, dtype=D64), torch.linalg.cholesky(cov))
    fitted, info = fit_tails(lambda x: 0.5 * (((x - 1) @ prec) * (x - 1)).sum(-1), exact,
                             generator=torch.Generator().manual_seed(1))
    if isinstance(fitted, TailAffineMap):
        torch.testing.assert_close(fitted.left, torch.ones(5, dtype=D64), rtol=0, atol=0.1)
        torch.testing.assert_close(fitted.right, torch.ones(5, dtype=D64), rtol=0, atol=0.1)
    assert abs(info["tails_elbo"] - info["gaussian_elbo"]) < 0.01


def test_natural_fits_from_every_start_escape_a_spike_mode():
    # Neal's funnel in 10-D: a start in the neck (a Gaussian at small scale, where a Laplace fit of a hierarchical
    # model sits) stays near the neck; the fit from the identity covers the bulk. The multi-start fit keeps the
    # better one by the ELBO on common draws
    dim = 10

    def funnel(x):
        v, rest = x[:, 0], x[:, 1:]
        return v**2 / 18 + 0.5 * (rest**2 * torch.exp(-v)[:, None]).sum(-1) + 0.5 * (dim - 1) * v

    log_z = 0.5 * dim * math.log(2 * math.pi) + math.log(3.0)
    spike = AffineMap(torch.tensor([-6.0] + [0.0] * (dim - 1), dtype=D64),
                      torch.diag(torch.tensor([0.3] + [0.05] * (dim - 1), dtype=D64)))
    identity = AffineMap.identity(dim, dtype=D64)
    fitted, info = fit_gaussian_starts(funnel, [spike, identity], generator=torch.Generator().manual_seed(0))
    gap = log_z - float(gaussian_elbo(funnel, fitted, 20_000, generator=torch.Generator().manual_seed(2)))
    assert info["start"] == 1 and info["start_elbos"][1] > info["start_elbos"][0] + 1.0, info
    assert 0 < gap < 3.0
