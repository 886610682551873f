# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.marginal: the marginal-mixture preconditioner (quantile transform, its exact volume and
derivatives, its importance-weighted EM fit)."""

import math

import pytest
import torch

from pyro_osds.ops.affine import AffineMap, preconditioner_from_state, whiten_potential
from pyro_osds.ops.marginal import MarginalMixtureMap, fit_marginal_mixture, mixture_marginals
from tests.common import D64


def _random_map(dim=3, k=3, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return MarginalMixtureMap(rand(dim), 0.5 + torch.rand(dim, generator=g, dtype=dtype), rand(dim, k),
                              3.0 * rand(dim, k), -1.0 + 0.5 * rand(dim, k))


def _mixture_cdf(u, m):
    """The logistic mixture's CDF written out directly (not through the map's tail-safe arithmetic)."""
    return (torch.softmax(m.logits, -1) * torch.sigmoid((u.unsqueeze(-1) - m.loc) / m.log_scale.exp())).sum(-1)


def test_the_map_is_the_quantile_transform_to_each_coordinates_mixture():
    m = _random_map()
    y = torch.linspace(-5, 5, 41, dtype=D64)[:, None].expand(-1, 3)
    u = (m(y) - m.shift) / m.scale
    # F(M(y)) = Phi(y), checked with the plain CDFs rather than the map's own tail-safe arithmetic
    assert torch.allclose(_mixture_cdf(u, m), torch.distributions.Normal(0.0, 1.0).cdf(y), atol=1e-12)
    assert bool((u[1:] > u[:-1]).all())  # increasing


def test_inverse_round_trip_including_far_tails():
    m = _random_map(seed=1)
    y = torch.cat([torch.randn(500, 3, dtype=D64), torch.tensor([[-8.0, 0.0, 8.0], [8.0, -8.0, 0.5]], dtype=D64)])
    x = m(y)
    assert torch.allclose(m.inverse(x), y, atol=1e-9, rtol=0)
    assert torch.allclose(m(m.inverse(x)), x, atol=1e-9, rtol=0)


def test_log_abs_det_is_the_autograd_jacobian_and_second_derivatives_are_exact():
    m = _random_map(seed=2)
    y = torch.randn(20, 3, dtype=D64).requires_grad_(True)
    x, log_abs_det = m.forward_and_log_abs_det(y)
    (dx,) = torch.autograd.grad(x.sum(), y, create_graph=True)  # elementwise map: the Jacobian's diagonal
    assert torch.allclose(log_abs_det, dx.log().sum(-1), atol=1e-10)
    (d2x,) = torch.autograd.grad(dx.sum(), y)
    def first_derivative(v):  # elementwise map: the derivative of each output in its own input
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(m(v).sum(), v)[0]

    eps = 1e-5
    fd = (first_derivative(y + eps) - first_derivative(y - eps)) / (2 * eps)
    assert torch.allclose(d2x, fd, rtol=1e-5, atol=1e-6)


def test_derivatives_in_the_mixture_parameters_match_finite_differences():
    m = _random_map(seed=3)
    y = torch.randn(10, 3, dtype=D64)
    loc = m.loc.clone().requires_grad_(True)
    value = lambda locs: m._replace(loc=locs)(y).sum()  # noqa: E731
    (grad,) = torch.autograd.grad(value(loc), loc)
    eps = 1e-6
    for i, k in [(0, 0), (1, 2), (2, 1)]:
        step = torch.zeros_like(m.loc)
        step[i, k] = eps
        fd = (value(m.loc + step) - value(m.loc - step)) / (2 * eps)
        assert float(grad[i, k]) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


def test_state_round_trip_and_the_affine_interface():
    m = _random_map(seed=4)
    back = preconditioner_from_state(m.state(), dtype=torch.float32)
    assert isinstance(back, MarginalMixtureMap) and back.loc.dtype == torch.float32
    assert all(torch.allclose(a.to(D64), b, atol=1e-6) for a, b in zip(back, m, strict=True))
    affine = AffineMap(torch.ones(3, dtype=D64), torch.tril(torch.rand(3, 3, dtype=D64)) + torch.eye(3, dtype=D64))
    restored = preconditioner_from_state(affine.state())
    z = torch.randn(4, 3, dtype=D64)
    x, log_abs_det = restored.forward_and_log_abs_det(z)
    assert torch.equal(x, affine(z)) and torch.equal(log_abs_det, affine.log_abs_det.expand(4))
    # the whitened potential pulls back through either map: U(T(y)) - log|det T'(y)|
    potential = lambda x: 0.5 * (x**2).sum(-1)  # noqa: E731
    x, log_abs_det = m.forward_and_log_abs_det(z)
    assert torch.allclose(whiten_potential(potential, m)(z), potential(x) - log_abs_det)


def _two_well_product(dim=6, weight=0.3, gap=6.0):
    """A product of 1-D mixtures weight N(-gap/2, 1) + (1 - weight) N(gap/2, 1), normalised: log Z = 0."""
    def potential(x):
        a = math.log(weight) - 0.5 * (x + gap / 2) ** 2
        b = math.log1p(-weight) - 0.5 * (x - gap / 2) ** 2
        return -(torch.logaddexp(a, b) - 0.5 * math.log(2 * math.pi)).sum(-1)
    return potential


def _found_modes(dim, gap, count, seed=0):
    """``count`` of the 2^dim modes, as a mode search would report them (Laplace fits, equal masses)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (count, dim), generator=g).to(D64) * 2 - 1
    return [(AffineMap(s * gap / 2, torch.eye(dim, dtype=D64)), 1.0 / count) for s in signs]


def test_mixture_marginals_start_from_the_found_modes():
    modes = _found_modes(4, 6.0, 30)
    m = mixture_marginals(modes, 2)
    centres = torch.stack([a.shift for a, _ in modes])
    assert torch.allclose(m.shift, centres.mean(0))
    u = (centres - m.shift) / m.scale
    for i in range(4):  # one component at each well; equal masses: the wells weigh the same
        order = m.loc[i].argsort()
        assert torch.allclose(m.loc[i][order], torch.stack([u[:, i].min(), u[:, i].max()]), atol=1e-9)
        assert torch.allclose(torch.softmax(m.logits[i], -1), torch.full((2,), 0.5, dtype=D64), atol=1e-9)


def test_the_wells_weights_come_from_the_modes_masses_however_light():
    # a sample of the modes of a product whose coordinates' light wells weigh 0.03 to 0.4: every mode but the
    # heaviest found is far lighter than it (a search drops them as light), yet their masses give each well's weight
    dim, gap, count = 16, 6.0, 40
    light = torch.linspace(0.03, 0.4, dim, dtype=D64)
    modes = _found_modes(dim, gap, count, seed=3)
    signs = torch.stack([a.shift for a, _ in modes]) / (gap / 2)
    log_mass = torch.where(signs < 0, light.log(), (1 - light).log()).sum(-1)
    mass = torch.softmax(log_mass, 0)
    assert float((mass < 1e-3 * mass.max()).to(D64).mean()) > 0.4  # many below what a search keeps
    modes = [(a, float(w)) for (a, _), w in zip(modes, mass, strict=True)]
    m = mixture_marginals(modes, 3)
    for i in range(dim):
        share = torch.softmax(m.logits[i], -1)
        low, high = m.loc[i].argmin(), m.loc[i].argmax()
        assert float(m.loc[i, low] * m.scale[i] + m.shift[i]) == pytest.approx(-gap / 2, abs=1e-9)
        assert float(m.loc[i, high] * m.scale[i] + m.shift[i]) == pytest.approx(gap / 2, abs=1e-9)
        assert float(share[low]) == pytest.approx(float(light[i]), abs=2e-3)  # the floor of 1e-3 per component
        assert float(share[high]) == pytest.approx(float(1 - light[i]), abs=2e-3)


def test_importance_weighted_em_gets_the_wells_weights_and_log_z():
    dim, weight, gap = 6, 0.3, 6.0
    potential = _two_well_product(dim, weight, gap)
    m, info = fit_marginal_mixture(potential, _found_modes(dim, gap, 20), num_components=2,
                                   generator=torch.Generator().manual_seed(0))
    assert info["ess_per_draw"] > 0.5  # Gaussian wells from logistic components
    y = torch.randn(20000, dim, dtype=D64, generator=torch.Generator().manual_seed(1))
    x, log_abs_det = m.forward_and_log_abs_det(y)
    log_w = -potential(x) + 0.5 * (y**2).sum(-1) + 0.5 * dim * math.log(2 * math.pi) + log_abs_det
    log_z = float(log_w.logsumexp(0) - math.log(len(log_w)))
    se = math.sqrt(float(torch.softmax(log_w, 0).square().sum()) - 1 / len(log_w))  # delta-method SE of log Z
    assert abs(log_z) < 4.5 * se + 1e-3  # truth 0
    low_share = (x < 0).to(D64).mean(0)
    assert torch.allclose(low_share, torch.full((dim,), weight, dtype=D64), atol=0.02)
