# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.precondition: affine maps, Laplace and Gaussian fits, mode search, mode shares."""

import math

import pytest
import torch

from pyro_osds.ops.affine import AffineMap, covering_gaussian, whiten_potential
from pyro_osds.ops.mode_search import LaplacePartition, _newton_direction, lost_modes, mode_shares, search_modes
from pyro_osds.ops.precondition import fit_gaussian, fit_gaussian_natural, fit_laplace, gaussian_elbo
from tests.common import D64, gaussian_mixture_potential, two_mode_potential


def gaussian_target(dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, dtype=D64, generator=g)
    cov = a @ a.T + 0.5 * torch.eye(dim, dtype=D64)
    mean = torch.randn(dim, dtype=D64, generator=g)
    prec = torch.linalg.inv(cov)

    def potential(x):
        r = x - mean
        return 0.5 * ((r @ prec) * r).sum(-1) + 2.0

    log_z = 0.5 * dim * math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item() - 2.0
    return potential, mean, cov, log_z


def test_affine_map_round_trip_and_log_det():
    g = torch.Generator().manual_seed(1)
    scale = torch.tril(torch.randn(4, 4, dtype=D64, generator=g)) + 3 * torch.eye(4, dtype=D64)
    affine = AffineMap(torch.randn(4, dtype=D64, generator=g), scale)
    z = torch.randn(10, 4, dtype=D64, generator=g)
    torch.testing.assert_close(affine.inverse(affine(z)), z, rtol=0, atol=1e-12)
    assert float(affine.log_abs_det) == pytest.approx(float(torch.linalg.slogdet(scale)[1]), abs=1e-12)
    ident = AffineMap.identity(4, scale=2.0, dtype=D64)
    torch.testing.assert_close(ident(z), 2 * z)


def test_whitened_potential_keeps_the_normaliser():
    potential, mean, cov, log_z = gaussian_target()
    affine = AffineMap(mean + 0.3, torch.linalg.cholesky(cov) * 0.7)
    whitened = whiten_potential(potential, affine)
    # integrate exp(-U_z) by importance sampling from N(0, I): exact for a Gaussian-in-z integrand
    z = torch.randn(200_000, 3, dtype=D64)
    log_q = -0.5 * (z * z).sum(-1) - 1.5 * math.log(2 * math.pi)
    lw = -whitened(z) - log_q
    est = torch.logsumexp(lw, 0) - math.log(z.shape[0])
    assert float(est) == pytest.approx(log_z, abs=0.02)


def test_laplace_recovers_a_gaussian_exactly():
    potential, mean, cov, _ = gaussian_target()
    affine, info = fit_laplace(potential, torch.zeros(3, dtype=D64))
    assert info["converged"]
    torch.testing.assert_close(affine.shift, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(affine.scale_tril @ affine.scale_tril.T, cov, rtol=1e-6, atol=1e-8)
    diag, _ = fit_laplace(potential, torch.zeros(3, dtype=D64), diagonal=True)
    torch.testing.assert_close(diag.scale_tril.diagonal() ** -2, torch.linalg.inv(cov).diagonal(), rtol=1e-6, atol=0)


def test_gaussian_fit_reaches_the_exact_elbo_on_a_gaussian():
    potential, mean, cov, log_z = gaussian_target()
    start = AffineMap.identity(3, dtype=D64)
    affine, info = fit_gaussian(potential, [start], num_iterations=600, learning_rate=3e-2)
    elbo = float(gaussian_elbo(potential, affine, 4000))
    assert elbo > info["pilot_elbos"][0]
    assert elbo == pytest.approx(log_z, abs=0.05)  # ELBO = log Z - KL, KL -> 0


def test_natural_gradient_fit_recovers_a_gaussian():
    # on a Gaussian target the expected Hessian is the precision itself: the precision converges geometrically
    # (exact to rounding after 40 steps); the mean's error is the last steps' Monte-Carlo noise (beta ~ 1/t)
    potential, mean, cov, log_z = gaussian_target(dim=6, seed=1)
    start = AffineMap.identity(6, shift=torch.full((6,), 3.0, dtype=D64), dtype=D64)
    affine, info = fit_gaussian_natural(potential, start, generator=torch.Generator().manual_seed(0))
    # P_t - A = (I - A) * prod(1 - beta_t) = (I - A) * 2^-10 * (6*7*8*9*10)/(36*37*38*39*40) ~ 4e-7 (I - A)
    precision = torch.linalg.inv(cov)
    fitted = torch.cholesky_inverse(affine.scale_tril)
    bound = 4e-7 * float((torch.eye(6, dtype=D64) - precision).abs().max())
    torch.testing.assert_close(fitted, precision, rtol=0, atol=1.01 * bound)
    # the mean's error in whitened units follows e <- (1 - b) e - b * (mean of 16 standard normals): its variance
    # per coordinate is v below, and its squared Mahalanobis length v * chi2(6) (0.999 quantile 22.46)
    variance = 0.0
    for step in range(40):
        beta = 0.5 if step < 10 else 5 / (step + 1)
        variance = (1 - beta) ** 2 * variance + beta**2 / 16
    mahalanobis2 = float((affine.shift - mean) @ torch.linalg.solve(cov, affine.shift - mean))
    assert mahalanobis2 < 22.46 * variance
    # ELBO = log Z - KL, KL = mahalanobis2 / 2 with the covariance exact; 256 draws: SE sqrt(mahalanobis2 / 256)
    assert info["elbo"] == pytest.approx(log_z - mahalanobis2 / 2, abs=4 * (mahalanobis2 / 256) ** 0.5 + 1e-9)
    assert info["skipped_steps"] == 0


def test_natural_gradient_fit_reaches_a_modeless_hierarchical_posterior():
    # centred random effects: the density grows without bound as tau -> 0 (no Laplace fit), and Adam from the
    # identity is slow; 40 natural-gradient steps get within a nat of log Z (quadrature over log tau)
    groups = 30
    g = torch.Generator().manual_seed(0)
    sigma = 0.5 + torch.rand(groups, dtype=D64, generator=g)
    y = 1.0 + torch.randn(groups, dtype=D64, generator=g) + sigma * torch.randn(groups, dtype=D64, generator=g)
    normal = torch.distributions.Normal

    def potential(x):  # x = (mu, log tau, theta); mu ~ N(0, 5), tau ~ HalfNormal(2)
        mu, log_tau, theta = x[:, 0], x[:, 1], x[:, 2:]
        tau = log_tau.exp()
        log_p = (normal(0.0, 5.0).log_prob(mu) + math.log(2) + normal(0.0, 2.0).log_prob(tau) + log_tau
                 + normal(mu[:, None], tau[:, None]).log_prob(theta).sum(-1) + normal(theta, sigma).log_prob(y).sum(-1))
        return -log_p

    log_tau = torch.linspace(-12, 4, 20001, dtype=D64)
    var = log_tau.exp()[:, None] ** 2 + sigma**2
    prec = 1 / 25 + (1 / var).sum(-1)
    integrand = (-0.5 * math.log(25) - 0.5 * torch.log(2 * math.pi * var).sum(-1) - 0.5 * (y**2 / var).sum(-1)
                 - 0.5 * prec.log() + 0.5 * (y / var).sum(-1) ** 2 / prec
                 + math.log(2) + normal(0.0, 2.0).log_prob(log_tau.exp()) + log_tau)
    log_z = float(torch.logsumexp(integrand, 0) + math.log(float(log_tau[1] - log_tau[0])))
    start = AffineMap.identity(groups + 2, dtype=D64)
    assert float(gaussian_elbo(potential, start, 1000)) < log_z - 50
    affine, info = fit_gaussian_natural(potential, start, generator=torch.Generator().manual_seed(0))
    elbo = float(gaussian_elbo(potential, affine, 4000, generator=torch.Generator().manual_seed(1)))
    assert log_z - 1.0 < elbo < log_z


def test_gaussian_fit_starts_from_the_better_candidate_and_avoids_the_funnel_spike():
    def funnel(x):
        v, rest = x[:, 0], x[:, 1:]
        return v**2 / 18 + 0.5 * (rest**2).sum(-1) * torch.exp(-v) + 0.5 * rest.shape[-1] * v

    laplace, _ = fit_laplace(funnel, torch.zeros(5, dtype=D64))
    assert float(laplace.shift[0]) < -10  # the Laplace fit collapses onto the spike
    identity = AffineMap.identity(5, dtype=D64)
    assert float(gaussian_elbo(funnel, identity, 500)) > float(gaussian_elbo(funnel, laplace, 500))
    affine, info = fit_gaussian(funnel, [laplace, identity], num_iterations=200)
    assert info["start"] == 1
    assert float(affine.shift[0]) > -3


def test_mode_search_finds_both_modes_with_their_masses():
    search = search_modes(two_mode_potential, torch.zeros(2, dtype=D64), starts_per_round=8,
                          generator=torch.Generator().manual_seed(0))
    modes = search.modes
    assert search.saturated and len(modes) == 2
    (heavy, w_heavy), (light, w_light) = modes
    torch.testing.assert_close(heavy.shift, torch.tensor([3.0, 0.0], dtype=D64), rtol=0, atol=1e-5)
    torch.testing.assert_close(light.shift, torch.tensor([-3.0, 0.0], dtype=D64), rtol=0, atol=1e-5)
    # well separated Gaussian components: the Laplace masses are the mixture weights
    assert w_heavy == pytest.approx(0.7, abs=1e-4) and w_light == pytest.approx(0.3, abs=1e-4)
    cover = covering_gaussian(modes)
    torch.testing.assert_close(cover.shift, torch.tensor([1.2, 0.0], dtype=D64), rtol=0, atol=1e-4)
    cov = cover.scale_tril @ cover.scale_tril.T
    # mixture variance along x: sum w (s^2 + m^2) - mean^2 = 0.25 + 0.3*9 + 0.7*9 - 1.44
    assert float(cov[0, 0]) == pytest.approx(0.25 + 9.0 - 1.44, rel=1e-4)


def test_the_mode_search_holds_standard_coordinates_at_zero():
    """Coordinates known to be standard normal and independent of the rest (a whitened conditionally Gaussian
    block): the search runs over the others, and finds the full search's modes, masses and Laplace scales, with
    centre 0 and scale 1 on those coordinates; the Laplace scales stay lower triangular in the flat order."""
    standard = torch.tensor([0, 2, 3, 5], dtype=torch.long)
    other = torch.tensor([1, 4], dtype=torch.long)

    def potential(z):
        return two_mode_potential(z[:, other]) + 0.5 * (z[:, standard] ** 2).sum(-1)

    options = dict(starts_per_round=8, generator=torch.Generator().manual_seed(0))
    full = search_modes(potential, torch.zeros(6, dtype=D64), **options)
    options["generator"] = torch.Generator().manual_seed(0)
    reduced = search_modes(potential, torch.zeros(6, dtype=D64), standard=standard, **options)
    assert reduced.saturated and len(reduced.modes) == len(full.modes) == 2
    for (a, w), (b, v) in zip(reduced.modes, full.modes, strict=True):
        torch.testing.assert_close(a.shift, b.shift, rtol=0, atol=1e-5)
        assert (a.shift[standard] == 0).all() and w == pytest.approx(v, abs=1e-6)
        cov, full_cov = a.scale_tril @ a.scale_tril.T, b.scale_tril @ b.scale_tril.T
        torch.testing.assert_close(cov, full_cov, rtol=0, atol=1e-6)
        assert torch.equal(a.scale_tril, torch.tril(a.scale_tril))
        torch.testing.assert_close(a.scale_tril[standard][:, standard], torch.eye(4, dtype=D64), rtol=0, atol=0)


def test_mode_search_merges_a_single_mode():
    potential, mean, _, _ = gaussian_target()
    search = search_modes(potential, torch.zeros(3, dtype=D64), starts_per_round=4,
                          generator=torch.Generator().manual_seed(0))
    modes = search.modes
    assert len(modes) == 1 and modes[0][1] == pytest.approx(1.0) and search.num_light == 0
    torch.testing.assert_close(modes[0][0].shift, mean, rtol=0, atol=1e-6)


def light_mode_potential(x):
    # a main mode at (-2, 0) and a second one at (2, 0) with a 1e-6 share of the mass
    main = torch.distributions.Normal(torch.tensor([-2.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    light = torch.distributions.Normal(torch.tensor([2.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    return -torch.logaddexp(main + math.log1p(-1e-6), light + math.log(1e-6))


def test_mode_search_counts_and_warns_about_light_modes():
    from pyro_osds.config import OSDSConfig
    from pyro_osds.samplers import FlowSampler

    search = search_modes(light_mode_potential, torch.zeros(2, dtype=D64), starts_per_round=16,
                          generator=torch.Generator().manual_seed(0))
    modes = search.modes
    assert len(modes) == 1 and search.num_light == 1
    torch.testing.assert_close(modes[0][0].shift, torch.tensor([-2.0, 0.0], dtype=D64), rtol=0, atol=1e-4)
    sampler = FlowSampler(light_mode_potential, torch.zeros(2, dtype=D64), OSDSConfig(mode_search_starts=16),
                          generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="1 further local optima"):
        sampler.fit_preconditioner()
    assert sampler.report.num_light == 1 and sampler.report.num_modes == 1 and sampler.report.saturated


def test_mode_shares_and_lost_modes():
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 5.0]], dtype=D64)
    x = torch.tensor([[-2.5, 0.1], [-3.2, 0.3], [2.9, -0.2], [0.4, 4.0]], dtype=D64)
    log_w = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D64)) + 7.0  # any normalisation
    torch.testing.assert_close(mode_shares(x, log_w, centers), torch.tensor([0.3, 0.3, 0.4], dtype=D64))
    # a non-finite log-weight carries no weight
    log_w[3] = float("nan")
    torch.testing.assert_close(mode_shares(x, log_w, centers), torch.tensor([0.5, 0.5, 0.0], dtype=D64))
    # lost: mass >= 5% and share < a tenth of it
    assert lost_modes([0.6, 0.3, 0.1], [0.9, 0.1, 0.0]) == [2]
    assert lost_modes([0.6, 0.3, 0.1], [0.95, 0.02, 0.03]) == [1]
    assert lost_modes([0.98, 0.02], [1.0, 0.0]) == []  # too light to call


def test_the_mode_search_finds_every_mode_of_a_grid_mixture_and_their_masses():
    grid = torch.tensor([-5.0, 0.0, 5.0], dtype=D64)
    locs = torch.cartesian_prod(grid, grid)
    potential = gaussian_mixture_potential(locs, torch.full((9,), 1 / 9, dtype=D64), math.sqrt(0.3))
    search = search_modes(potential, torch.zeros(2, dtype=D64), generator=torch.Generator().manual_seed(0))
    assert search.saturated and len(search.modes) == 9 and search.num_light == 0
    centres = torch.stack([a.shift for a, _ in search.modes])
    assert float(torch.cdist(locs, centres).min(1).values.max()) < 1e-6  # every mode, at its centre
    assert [w for _, w in search.modes] == pytest.approx([1 / 9] * 9, abs=1e-6)  # exact Laplace masses here
    for affine, _ in search.modes:  # and their Laplace fits: the component covariances 0.3 I
        torch.testing.assert_close(affine.scale_tril, math.sqrt(0.3) * torch.eye(2, dtype=D64), atol=1e-5, rtol=0)


def test_far_apart_modes_are_found_by_doubling_the_spread():
    # three modes 40 sd from the starting point and from each other
    locs = torch.tensor([[40.0, 0.0], [-20.0, 35.0], [-20.0, -35.0]], dtype=D64)
    potential = gaussian_mixture_potential(locs, [0.2, 0.3, 0.5])
    search = search_modes(potential, torch.zeros(2, dtype=D64), generator=torch.Generator().manual_seed(1))
    assert search.saturated and len(search.modes) == 3
    assert sorted(w for _, w in search.modes) == pytest.approx([0.2, 0.3, 0.5], abs=1e-6)


def test_a_product_of_bimodal_factors_exhausts_the_search():
    # 8 independent double wells: 256 modes, more than the budget can enumerate
    def potential(x):
        return ((x**2 - 4.0) ** 2).sum(-1)

    search = search_modes(potential, torch.zeros(8, dtype=D64), starts_per_round=16, max_starts=96,
                          generator=torch.Generator().manual_seed(0))
    assert not search.saturated and search.num_starts == 96 and len(search.modes) > 20


def test_the_laplace_partition_is_a_partition_of_unity():
    modes = [(AffineMap(torch.tensor([-2.0, 0.0], dtype=D64), torch.eye(2, dtype=D64)), 0.3),
             (AffineMap(torch.tensor([2.0, 1.0], dtype=D64), torch.tensor([[0.5, 0.0], [0.2, 0.8]], dtype=D64)), 0.7)]
    partition = LaplacePartition(modes)
    x = 3 * torch.randn(50, 2, dtype=D64)
    log_s = partition(x)
    torch.testing.assert_close(torch.logsumexp(log_s, 0), torch.zeros(50, dtype=D64), atol=1e-12, rtol=0)
    # each piece is the mode's responsibility under the Laplace mixture
    dens = torch.stack([math.log(w) + torch.distributions.MultivariateNormal(a.shift, scale_tril=a.scale_tril).log_prob(x)
                        for a, w in modes])
    torch.testing.assert_close(log_s, dens - torch.logsumexp(dens, 0), atol=1e-12, rtol=0)
    restricted = partition.restricted(lambda z: (z**2).sum(-1), 1)
    torch.testing.assert_close(restricted(x), (x**2).sum(-1) - log_s[1], atol=1e-12, rtol=0)


def test_newton_directions_descend_and_skip_what_cannot_be_solved():
    score = torch.tensor([[1.0, -2.0], [1.0, 1.0], [0.5, 0.5], [1.0, 0.0]], dtype=D64)
    hessian = torch.stack([
        torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D64),  # positive definite: the Newton step itself
        torch.tensor([[1.0, 0.0], [0.0, -4.0]], dtype=D64),  # a saddle: |H| gives a descent direction
        torch.tensor([[math.nan, 0.0], [0.0, 1.0]], dtype=D64),  # not finite: no step
        torch.zeros(2, 2, dtype=D64),  # flat: floored eigenvalues, a finite step
    ])
    step, indefinite = _newton_direction(hessian, score)
    torch.testing.assert_close(step[0], torch.linalg.solve(hessian[0], score[0]))
    torch.testing.assert_close(step[1], torch.tensor([1.0, 0.25], dtype=D64))
    assert step[2].tolist() == [0.0, 0.0] and bool(torch.isfinite(step[3]).all())
    assert bool(((step * score).sum(-1)[[0, 1, 3]] > 0).all())  # uphill in log density: downhill in U
    assert indefinite.tolist() == [False, True, False, True]
    # above eigen_max_dim: the score over |diag H| (no eigendecomposition), still downhill at the saddle
    cheap, _ = _newton_direction(hessian, score, eigen_max_dim=1)
    torch.testing.assert_close(cheap[1], torch.tensor([1.0, 0.25], dtype=D64))
    assert float((cheap[1] * score[1]).sum()) > 0


def test_a_gpus_way_of_the_set_up_loops_gives_the_cpus_results():
    # on a GPU the Gaussian fit and the mode search's descent mask the non-finite draws instead of selecting them
    # and read the device once an iteration (the fit) or every 25 (the descent): the same results, here on the CPU
    from pyro_osds.ops.mode_search import _descend

    def potential(x):  # a narrow Gaussian cut off beyond |x_0| = 2.5: the wide start's draws are often not finite
        u = 0.5 * ((x - torch.tensor([0.5, -1.0], dtype=x.dtype)) ** 2 / torch.tensor([0.3, 0.2], dtype=x.dtype)).sum(-1)
        return torch.where(x[..., 0].abs() > 2.5, torch.full_like(u, math.inf), u)

    start = AffineMap(torch.zeros(2, dtype=D64), 2.0 * torch.eye(2, dtype=D64))
    fits = [fit_gaussian(potential, [start], num_iterations=150, learning_rate=5e-2,
                         generator=torch.Generator().manual_seed(3), read_every_iteration=every)
            for every in (True, False)]
    assert math.isfinite(fits[0][1]["elbo"]) and not math.isfinite(fits[0][1]["pilot_elbos"][0])  # it moved
    # a start none of whose draws is finite: no step either way (a zero masked gradient would widen the scale)
    # (stepping on it, the GPU's way drifted into a fit at shift (0.50, -1.02) where the CPU's stays)
    stuck = AffineMap(torch.tensor([3.0, 0.0], dtype=D64), 0.05 * torch.eye(2, dtype=D64))
    with pytest.warns(RuntimeWarning, match="did not reach a finite ELBO"):
        fits = [fit_gaussian(potential, [stuck], num_iterations=300, learning_rate=5e-2,
                             generator=torch.Generator().manual_seed(3), read_every_iteration=every)
                for every in (True, False)]
    for affine, _ in fits:
        torch.testing.assert_close(affine.shift, stuck.shift, rtol=0, atol=0)
    assert fits[0][1]["elbo"] == fits[1][1]["elbo"]
    torch.testing.assert_close(fits[0][0].scale_tril, fits[1][0].scale_tril, rtol=0, atol=0)
    starts = torch.tensor([[0.0, 0.0], [2.0, 1.0], [3.0, 0.0], [-2.4, 2.0]], dtype=D64)
    descents = [_descend(potential, starts, scale=1.0, iterations=60, read_every_iteration=every)
                for every in (True, False)]
    for a, b in zip(*descents, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isfinite(descents[0][1]).any())
