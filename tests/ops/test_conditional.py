# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.conditional: the conditional whitening map, its log-determinant, inverse, potential and the
quadratic-block check, the colourings, and the Laplace form of a block that is not quadratic (float64)."""

import math

import torch

from pyro_osds.ops.conditional import (
    WhiteningBlock,
    block_diagonal,
    colour_columns,
    colour_symmetric,
    conditional_gaussian,
    independent_groups,
    is_quadratic,
    unwhiten,
    whiten,
    whitened_potential,
)
from tests.common import D64

DIM, DX = 5, 3  # z = (s_0, x_0, s_1, x_1, x_2): the whitened coordinates are not a contiguous block
X_INDEX = [1, 3, 4]
S_INDEX = [0, 2]


def split(z):
    return z[:, S_INDEX], z[:, X_INDEX]


def quadratic(z):
    """U = 1/2 (x - a(s))^T A(s) (x - a(s)) + c(s), A(s) positive definite and a(s), c(s) non-linear in s."""
    s, x = split(z)
    base = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=z.dtype)
    scale = torch.exp(s[:, :1]).unsqueeze(-1)  # e^{s_0}
    a_matrix = scale * base + torch.diag_embed(torch.sigmoid(s[:, 1:2]).expand(-1, DX))
    a = torch.stack([torch.sin(s[:, 0]), s[:, 1] ** 2, s[:, 0] * s[:, 1]], -1)
    r = (x - a).unsqueeze(-1)
    c = 0.5 * (s**2).sum(-1) + torch.cos(s[:, 1])
    return 0.5 * (r.transpose(-1, -2) @ a_matrix @ r).reshape(-1) + c, a_matrix, a, c


def quadratic_potential(z):
    return quadratic(z)[0]


def quartic_potential(z):
    s, x = split(z)
    return quadratic_potential(z) + 0.1 * (x**4).sum(-1) + 0.05 * (s[:, :1] * x).pow(3).sum(-1)


def block(potential=None):
    return WhiteningBlock.of(DIM, X_INDEX, torch.tensor([0.2, -0.1, 0.3], dtype=D64))


def points(n=6, seed=0):
    return torch.randn(n, DIM, dtype=D64, generator=torch.Generator().manual_seed(seed))


def test_the_map_is_the_exact_conditional_of_a_quadratic_potential():
    z = points()
    s, _ = split(z)
    mean, chol = conditional_gaussian(quadratic_potential, s, block())
    assert chol.shape == (6, 1, DX, DX)  # one group: the curvature couples every coordinate
    chol = chol[:, 0]
    _, a_matrix, a, _ = quadratic(z)
    torch.testing.assert_close(mean, a, rtol=0, atol=1e-12)  # the conditional mean, whatever x_ref
    torch.testing.assert_close(chol @ chol.transpose(-1, -2), a_matrix, rtol=0, atol=1e-12)
    # U'(s, eps) - |eps|^2 / 2 = c(s) + 1/2 log det A(s): a function of s alone
    expected = quadratic(z)[3] + 0.5 * torch.logdet(a_matrix)
    eps = split(z)[1]
    torch.testing.assert_close(whitened_potential(quadratic_potential, z, block()) - 0.5 * (eps**2).sum(-1), expected,
                               rtol=0, atol=1e-10)


def test_log_det_matches_slogdet_of_the_jacobian_and_the_inverse_round_trips():
    for potential in (quadratic_potential, quartic_potential):  # exact whatever the potential
        z = points(seed=1)
        base, log_det = unwhiten(potential, z, block())
        for i in range(z.shape[0]):
            jac = torch.autograd.functional.jacobian(lambda v, u=potential: unwhiten(u, v[None], block())[0][0], z[i])
            sign, logabs = torch.linalg.slogdet(jac)
            assert float(sign) == 1.0
            torch.testing.assert_close(log_det[i], logabs, rtol=0, atol=1e-10)
        torch.testing.assert_close(whiten(potential, base, block()), z, rtol=0, atol=1e-10)
        torch.testing.assert_close(base[:, S_INDEX], z[:, S_INDEX], rtol=0, atol=0)


def test_whitened_potential_is_the_change_of_variables_and_its_gradient_goes_through_the_map():
    z = points(seed=2)
    base, log_det = unwhiten(quartic_potential, z, block())
    torch.testing.assert_close(whitened_potential(quartic_potential, z, block()), quartic_potential(base) - log_det,
                               rtol=0, atol=1e-12)
    # the gradient includes the derivatives of m(s) and C(s) (second derivatives of U): central differences
    zz = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(whitened_potential(quartic_potential, zz, block()).sum(), zz)
    h = 1e-5
    numeric = torch.empty_like(z)
    for j in range(DIM):
        step = torch.zeros(DIM, dtype=D64)
        step[j] = h
        numeric[:, j] = (whitened_potential(quartic_potential, z + step, block())
                         - whitened_potential(quartic_potential, z - step, block())) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-6)


def test_a_block_without_positive_curvature_still_gets_an_invertible_map():
    def saddle(z):
        s, x = split(z)
        return -0.5 * (x**2).sum(-1) * torch.exp(s[:, 0]) + (s**2).sum(-1)

    z = points(seed=3)
    base, log_det = unwhiten(saddle, z, block())
    assert torch.isfinite(base).all() and torch.isfinite(log_det).all()
    torch.testing.assert_close(log_det, torch.zeros_like(log_det), rtol=0, atol=0)  # C = I there
    torch.testing.assert_close(whiten(saddle, base, block()), z, rtol=0, atol=1e-12)


def test_is_quadratic_tells_quadratic_blocks_from_others():
    gen = torch.Generator().manual_seed(0)
    at = points(4, seed=4)
    assert is_quadratic(quadratic_potential, at, X_INDEX, generator=gen)
    assert is_quadratic(quadratic_potential, at, X_INDEX[:1], generator=gen)
    assert not is_quadratic(quadratic_potential, at, S_INDEX, generator=gen)  # e^{s} and sin(s) terms
    assert not is_quadratic(quartic_potential, at, X_INDEX, generator=gen)

    def logistic(z):
        return torch.nn.functional.softplus(z @ torch.linspace(-1, 1, DIM, dtype=D64)) + 0.5 * (z**2).sum(-1)

    assert not is_quadratic(logistic, at, X_INDEX, generator=gen)

    def infinite(z):
        return quadratic_potential(z) + math.inf

    assert not is_quadratic(infinite, at, X_INDEX, generator=gen)


def test_a_sparse_curvature_is_read_from_one_difference_per_colour():
    """A random walk's curvature is tridiagonal: three colours whatever its length, and the same m(s), C(s) as the
    dense reading."""
    steps = 12

    def walk(z):
        s, x = z[:, :1], z[:, 1:]
        increments = torch.cat([x[:, :1], x[:, 1:] - x[:, :-1]], -1) * torch.exp(-s)
        return 0.5 * (increments**2).sum(-1) + steps * s[:, 0] + 0.5 * ((x[:, ::3] - 1.0) ** 2).sum(-1) + s[:, 0] ** 2

    pattern = torch.zeros(steps, steps, dtype=torch.bool)
    for i in range(steps):
        pattern[i, max(i - 1, 0):i + 2] = True
    assert colour_columns(pattern).max() == 2
    assert colour_columns(torch.ones(4, 4, dtype=torch.bool)).tolist() == [0, 1, 2, 3]
    assert colour_columns(torch.eye(5, dtype=torch.bool)).tolist() == [0] * 5
    x_ref = torch.linspace(-1, 1, steps, dtype=D64)
    dense = WhiteningBlock.of(steps + 1, range(1, steps + 1), x_ref)
    sparse = WhiteningBlock.of(steps + 1, range(1, steps + 1), x_ref, pattern)
    assert sparse.num_colours == 3 and dense.num_colours == steps
    s = torch.randn(5, 1, dtype=D64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(conditional_gaussian(walk, s, sparse), conditional_gaussian(walk, s, dense), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_an_arrow_is_read_from_two_colours_by_symmetry():
    """A location coupled to every effect it centres (an arrow): its column has a colour of its own and its row is
    read from it, so the effects share one colour; the same m(s), C(s) as the dense reading."""
    effects = 9

    def hierarchy(z):
        s, mu, b = z[:, :1], z[:, 1:2], z[:, 2:]
        scale = torch.exp(s)
        data = torch.linspace(-2.0, 3.0, effects, dtype=z.dtype)
        return (0.5 * ((b - mu) / scale) ** 2).sum(-1) + effects * s[:, 0] + 0.5 * ((b - data) ** 2).sum(-1) \
            + 0.5 * mu[:, 0] ** 2 / 9.0 + 0.5 * s[:, 0] ** 2

    pattern = torch.eye(effects + 1, dtype=torch.bool)
    pattern[0, :] = pattern[:, 0] = True
    colour, dense = colour_symmetric(pattern)
    assert int(colour.max()) == 1 and dense.tolist() == [True] + [False] * effects
    assert colour_columns(pattern).max() == effects  # one colour per column without the symmetry
    ring = torch.eye(6, dtype=torch.bool) | torch.eye(6, dtype=torch.bool).roll(1, 0) | torch.eye(6, dtype=torch.bool).roll(-1, 0)
    assert not colour_symmetric(ring)[1].any()  # no dense column: the plain colouring
    x_ref = torch.linspace(-1, 1, effects + 1, dtype=D64)
    sparse = WhiteningBlock.of(effects + 2, range(1, effects + 2), x_ref, pattern)
    full = WhiteningBlock.of(effects + 2, range(1, effects + 2), x_ref)
    assert sparse.num_colours == 2 and full.num_colours == effects + 1
    s = torch.randn(4, 1, dtype=D64, generator=torch.Generator().manual_seed(6))
    for got, want in zip(conditional_gaussian(hierarchy, s, sparse), conditional_gaussian(hierarchy, s, full),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


COUNTS = torch.tensor([3.0, 11.0, 0.0], dtype=D64)
TRIALS = torch.tensor([12.0, 14.0, 9.0], dtype=D64)


def effects_logistic(z):
    """Binomial counts with logits x given a scale e^{s_0} and an offset s_1: x ~ N(s_1, e^{2 s_0}) (log-concave in
    x, not quadratic), plus a prior on s."""
    s, x = split(z)
    prior = 0.5 * ((x - s[:, 1:2]) * torch.exp(-s[:, :1])) ** 2 + s[:, :1]
    likelihood = TRIALS * torch.nn.functional.softplus(x) - COUNTS * x
    return (prior + likelihood).sum(-1) + 0.5 * (s**2).sum(-1)


def laplace_block(newton_steps=8):
    return WhiteningBlock.of(DIM, X_INDEX, torch.zeros(DX, dtype=D64), torch.eye(DX, dtype=torch.bool),
                             newton_steps=newton_steps)


def test_the_laplace_form_centres_a_log_concave_block_at_its_conditional_mode():
    """The damped Newton steps reach the conditional mode (the gradient vanishes there) and C is the factor of the
    curvature there, also from scales far from the data's (a zero count under a wide prior, whose mode is far out,
    takes the most steps)."""
    block = laplace_block(newton_steps=8)
    assert block.newton_steps == 8 and block.difference_step < 1e-4
    s = torch.tensor([[-2.0, 0.0], [0.0, 1.0], [1.5, -3.0], [3.0, 4.0]], dtype=D64)
    mean, chol = conditional_gaussian(effects_logistic, s, block)
    assert block.groups == DX and chol.shape == (4, DX, 1, 1)  # independent effects: factorised one by one
    chol = block_diagonal(chol)
    z = torch.zeros(4, DIM, dtype=D64)
    z[:, S_INDEX], z[:, X_INDEX] = s, mean
    z.requires_grad_(True)
    (grad,) = torch.autograd.grad(effects_logistic(z).sum(), z)
    assert grad[:, X_INDEX].abs().max() < 1e-6, grad
    hessian = torch.autograd.functional.hessian(lambda v: effects_logistic(v[None])[0], z[1].detach())
    curvature = hessian[X_INDEX][:, X_INDEX]
    torch.testing.assert_close(chol[1] @ chol[1].T, curvature, rtol=1e-5, atol=1e-6)


def test_the_laplace_form_is_an_exact_change_of_variables_with_the_implicit_gradient():
    """Whatever the Newton steps leave, the map is triangular: its log-determinant is the autograd Jacobian's, the
    inverse recovers the input, U' = U(x) - log|det|; the gradient of U' (the implicit function theorem's derivative
    of the conditional mode) matches central differences of U'."""
    block = laplace_block()
    z = torch.randn(4, DIM, dtype=D64, generator=torch.Generator().manual_seed(7))
    base, log_det = unwhiten(effects_logistic, z, block)
    torch.testing.assert_close(whiten(effects_logistic, base, block), z, rtol=0, atol=1e-9)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: unwhiten(effects_logistic, v[None], block)[0][0], z[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(whitened_potential(effects_logistic, z, block), effects_logistic(base) - log_det)
    point = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(whitened_potential(effects_logistic, point, block).sum(), point)
    h = 1e-5
    for j in range(DIM):
        e = torch.zeros(DIM, dtype=D64)
        e[j] = h
        central = (whitened_potential(effects_logistic, z + e, block) - whitened_potential(effects_logistic, z - e, block)) / (2 * h)
        torch.testing.assert_close(grad[:, j], central, rtol=1e-5, atol=1e-5)


def test_each_row_of_the_laplace_form_is_mapped_whatever_rows_share_its_batch():
    """Rows stop their Newton steps one by one (a far mode takes more), so a row maps to the same point alone or
    with others: the map applied to the weights is the one the draws are reported through (to the rounding of
    batched linear algebra, 1e-16, times the difference quotient's 1 / h)."""
    block = laplace_block()
    z = 2.0 * torch.randn(12, DIM, dtype=D64, generator=torch.Generator().manual_seed(8))
    together, log_det = unwhiten(effects_logistic, z, block)
    for i in range(12):
        alone, alone_log_det = unwhiten(effects_logistic, z[i:i + 1], block)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-9)
        torch.testing.assert_close(alone_log_det[0], log_det[i], rtol=0, atol=1e-9)


def test_independent_groups_of_a_block_diagonal_curvature_are_found_in_order():
    eye = torch.eye(6, dtype=torch.bool)
    assert independent_groups(eye)[1] == 6
    pairs = eye.clone()
    for i in range(3):
        pairs[i, i + 3] = pairs[i + 3, i] = True
    order, groups = independent_groups(pairs)
    assert groups == 3 and order.tolist() == [0, 3, 1, 4, 2, 5]
    unequal = eye.clone()
    unequal[0, 1] = unequal[1, 0] = True
    assert independent_groups(unequal)[1] == 1  # a pair and four singletons: factorised whole
    walk = eye | eye.roll(1, 0) | eye.roll(-1, 0)
    assert independent_groups(walk)[1] == 1


PAIR_DATA = torch.tensor([0.5, -1.0, 2.0], dtype=D64)


def pairs_potential(z, laplace=False):
    """Three independent pairs of effects (a_j, b_j) at coordinates (1 + j, 4 + j) given a log-scale s = z_0, each
    pair correlated by its prior and observed through its sum: quadratic in the effects (log-concave, not quadratic,
    with a softplus term)."""
    s, a, b = z[:, :1], z[:, 1:4], z[:, 4:]
    prior = 0.5 * (a**2 - 1.2 * a * b + b**2) * torch.exp(-2 * s) + 2 * s
    out = (prior + 0.5 * (a + b - PAIR_DATA) ** 2).sum(-1) + 0.5 * s[:, 0] ** 2
    return out + torch.nn.functional.softplus(3.0 * a).sum(-1) if laplace else out


def pairs_blocks(newton_steps=1):
    pattern = torch.eye(6, dtype=torch.bool)
    for i in range(3):
        pattern[i, i + 3] = pattern[i + 3, i] = True
    x_ref = torch.linspace(-0.5, 0.7, 6, dtype=D64)
    grouped = WhiteningBlock.of(7, range(1, 7), x_ref, pattern, newton_steps=newton_steps)
    dense = WhiteningBlock.of(7, range(1, 7), x_ref, newton_steps=newton_steps)
    return grouped, dense


def test_a_block_diagonal_curvature_is_whitened_group_by_group_with_the_same_map():
    """Independent pairs: read with two colours, factorised as three 2 x 2 matrices, the map (and its derivative) the
    dense factorisation's: a Cholesky factor has no fill-in between groups."""
    grouped, dense = pairs_blocks()
    assert grouped.groups == 3 and grouped.group_size == 2 and grouped.num_colours == 2
    assert grouped.x_index.tolist() == [1, 4, 2, 5, 3, 6] and dense.groups == 1
    z = torch.randn(5, 7, dtype=D64, generator=torch.Generator().manual_seed(9))
    for got, want in zip(unwhiten(pairs_potential, z, grouped), unwhiten(pairs_potential, z, dense), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(whiten(pairs_potential, unwhiten(pairs_potential, z, grouped)[0], grouped), z,
                               rtol=0, atol=1e-10)
    grads = []
    for blk in (grouped, dense):
        point = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(whitened_potential(pairs_potential, point, blk).sum(), point)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-9)


def test_the_laplace_form_of_independent_groups_is_exact_and_reaches_each_conditional_mode():
    """Not quadratic: each group takes its own damped Newton steps; the map is an exact change of variables
    (log-determinant vs the autograd Jacobian, round trip) and every group ends at its conditional mode, the dense
    block's."""
    grouped, dense = pairs_blocks(newton_steps=8)
    potential = lambda z: pairs_potential(z, laplace=True)  # noqa: E731
    z = torch.randn(4, 7, dtype=D64, generator=torch.Generator().manual_seed(10))
    base, log_det = unwhiten(potential, z, grouped)
    torch.testing.assert_close(whiten(potential, base, grouped), z, rtol=0, atol=1e-9)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: unwhiten(potential, v[None], grouped)[0][0], z[i])
        torch.testing.assert_close(log_det[i], torch.linalg.slogdet(jac)[1], rtol=1e-8, atol=1e-8)
    s = z[:, :1]
    mean, _ = conditional_gaussian(potential, s, grouped)
    dense_mean, _ = conditional_gaussian(potential, s, dense)
    order = [dense.x_index.tolist().index(i) for i in grouped.x_index.tolist()]
    torch.testing.assert_close(mean, dense_mean[:, order], rtol=0, atol=1e-7)


def test_groups_sparse_within_are_read_with_the_colours_of_one_group():
    """Two independent random walks of 30 steps given their log-scale: two groups, read with three colours (one
    colouring of the groups' patterns together, not one colour per coordinate of a group), the dense block's map."""
    steps = 30

    def walks(z):
        s, out = z[:, :1], 0.5 * z[:, 0] ** 2
        for walk in (z[:, 1:steps + 1], z[:, steps + 1:]):
            increments = torch.cat([walk[:, :1], walk[:, 1:] - walk[:, :-1]], -1) * torch.exp(-s)
            out = out + 0.5 * (increments**2).sum(-1) + steps * s[:, 0] + 0.5 * ((walk[:, ::4] - 1.0) ** 2).sum(-1)
        return out

    chain = torch.eye(steps, dtype=torch.bool) | torch.eye(steps, dtype=torch.bool).roll(1, 0) \
        | torch.eye(steps, dtype=torch.bool).roll(-1, 0)
    chain[0, -1] = chain[-1, 0] = False  # a walk, not a ring
    x_ref = torch.zeros(2 * steps, dtype=D64)
    grouped = WhiteningBlock.of(2 * steps + 1, range(1, 2 * steps + 1), x_ref, torch.block_diag(chain, chain))
    dense = WhiteningBlock.of(2 * steps + 1, range(1, 2 * steps + 1), x_ref)
    assert grouped.groups == 2 and grouped.num_colours == 3 and dense.num_colours == 2 * steps
    z = torch.randn(4, 2 * steps + 1, dtype=D64, generator=torch.Generator().manual_seed(12))
    for got, want in zip(unwhiten(walks, z, grouped), unwhiten(walks, z, dense), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
