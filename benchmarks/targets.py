# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Benchmark targets of the OSDS / "Beyond ELBOs" suite, each defined **once** and usable both as a
bare batched potential and as a Pyro model.

Every :class:`Target` carries

* ``potential``: a pure-torch function ``(batch, dim) -> (batch,)`` returning
  :math:`U(x) = -\log\rho(x)` for the (possibly unnormalised) density :math:`\rho` on
  :math:`\mathbb R^{\mathrm{dim}}`, twice differentiable by autograd, with no in-place operation on
  its input. Its normaliser is :math:`Z = \int e^{-U(x)}\,dx`; ``log_z`` is :math:`\log Z` when it is
  known exactly (otherwise ``None``; see :mod:`benchmarks.gold_standard` and ``references.json``);
* ``model`` / ``model_args``: a Pyro model whose unconstrained potential, as built by
  :func:`pyro.infer.mcmc.util.initialize_model`, equals ``potential`` at corresponding points;
* ``to_sites`` / ``from_sites``: the mapping between a flat vector and the dict of **unconstrained**
  site values that ``initialize_model``'s ``potential_fn`` takes. All targets are laid out so that the
  flat vector is the concatenation of the sites **in sorted name order** (the order in which Pyro
  and :class:`pyro_osds.potential.ModelTarget` pack sites), each site flattened, with positive sites
  on the log scale (Pyro's ``biject_to(positive)`` is ``exp``). Hence for all targets
  ``potential(x) == initialize_model(model, model_args)[1](to_sites(x))``;
* ``sample``: exact draws ``sample(n, generator=None) -> (n, dim)`` when available;
* ``labels``: a name per flat coordinate, and ``description``: what the density is and where it
  differs from the OSDS / Beyond-ELBOs code.

Targets are built lazily (the Bayesian ones load bundled data) and cached: use
:func:`get_target` or the :data:`TARGETS` mapping (``list(TARGETS)`` gives the names).

**References**

[1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, arXiv 2512.05251.
[2] `Beyond ELBOs: A Large-Scale Evaluation of Variational Methods for Sampling`, D. Blessing,
    X. Jia, J. Esslinger, F. Vargas, G. Neumann (2024), arXiv 2406.07423.
[3] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dube, P. Pynadath, R. Zhang (2025),
    arXiv 2502.07579.
[4] `Slice sampling`, R. M. Neal (2003), Annals of Statistics 31(3) (the funnel).
[5] `Inference Gym`, TensorFlow Probability (Brownian motion with missing middle observations).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro_osds.datasets import (
    load_breast_cancer,
    load_brownian_motion,
    load_german_credit,
    load_ionosphere,
    load_seeds,
    load_sonar,
)

__all__ = ["BAYESIAN_TARGETS", "TARGETS", "Target", "get_target", "many_well_log_z_1d"]

D64 = torch.float64
LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Target:
    r"""
    One benchmark target (see the module docstring for the conventions).

    :param str name: registry name.
    :param int dim: dimension of the flat unconstrained vector.
    :param callable potential: ``(batch, dim) -> (batch,)``, :math:`U = -\log\rho`.
    :param log_z: exact :math:`\log\int e^{-U}` or ``None`` when only a numerical reference exists.
    :param sample: ``sample(n, generator=None) -> (n, dim)`` exact draws, or ``None``.
    :param callable model: a Pyro model; ``model(*model_args)``.
    :param tuple model_args: the model's positional arguments (data).
    :param str description: the density, the parameterisation, and the differences from the paper code.
    :param callable to_sites: flat ``(..., dim)`` tensor -> ``{site: unconstrained value}``.
    :param callable from_sites: inverse of ``to_sites``.
    :param tuple labels: a name for every flat coordinate.
    :param modes: the mode locations ``(M, dim)`` of a multimodal target with known mode weights, or ``None``.
    :param mode_weights: the modes' exact masses ``(M,)`` (the share of the posterior nearest to each mode).
    """

    name: str
    dim: int
    potential: Callable[[torch.Tensor], torch.Tensor]
    log_z: float | None
    sample: Callable[..., torch.Tensor] | None
    model: Callable
    model_args: tuple
    description: str
    to_sites: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    from_sites: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    labels: tuple[str, ...]
    modes: torch.Tensor | None = None
    mode_weights: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# Site packing helpers


def _packing(shapes: dict[str, tuple[int, ...]]):
    """``to_sites`` / ``from_sites`` for sites packed in sorted name order, each flattened."""
    names = sorted(shapes)
    sizes = [math.prod(shapes[n]) for n in names]

    def to_sites(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, size in zip(names, sizes, strict=True):
            out[name] = x[..., start:start + size].reshape(tuple(x.shape[:-1]) + tuple(shapes[name]))
            start += size
        return out

    def from_sites(sites: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name, size in zip(names, sizes, strict=True):
            value = sites[name]
            batch = value.shape[:value.dim() - len(shapes[name])]
            parts.append(value.reshape(tuple(batch) + (size,)))
        return torch.cat(parts, dim=-1)

    return to_sites, from_sites


def _labels(shapes: dict[str, tuple[int, ...]], rename: Mapping[str, str] | None = None) -> tuple[str, ...]:
    rename = rename or {}
    out = []
    for name in sorted(shapes):
        label = rename.get(name, name)
        size = math.prod(shapes[name])
        out.extend([label] if shapes[name] == () else [f"{label}[{i}]" for i in range(size)])
    return tuple(out)


def _check_batch(x: torch.Tensor, dim: int) -> None:
    if x.dim() != 2 or x.shape[-1] != dim:
        raise ValueError(f"expected a (batch, {dim}) tensor, got shape {tuple(x.shape)}")


def _normal_log_prob(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Elementwise :math:`\\log N(x; 0, \\mathrm{scale}^2)`."""
    scale = torch.as_tensor(scale, dtype=x.dtype)
    return -0.5 * (x / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI


# ---------------------------------------------------------------------------------------------------
# Funnel


def _funnel10() -> Target:
    dim, scale0 = 10, 3.0
    shapes = {"x0": (), "xs": (dim - 1,)}
    to_sites, from_sites = _packing(shapes)

    def potential(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, dim)
        x0, xs = x[:, 0], x[:, 1:]
        # x_i | x0 ~ N(0, exp(x0)): variance exp(x0), log sd x0 / 2
        lp = _normal_log_prob(x0, scale0)
        lp = lp + (-0.5 * xs**2 * torch.exp(-x0)[:, None] - 0.5 * x0[:, None] - 0.5 * LOG_2PI).sum(-1)
        return -lp

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(n, dim, dtype=D64, generator=generator)
        x0 = scale0 * eps[:, :1]
        return torch.cat([x0, torch.exp(0.5 * x0) * eps[:, 1:]], dim=1)

    def model():
        x0 = pyro.sample("x0", dist.Normal(torch.tensor(0.0, dtype=D64), scale0))
        pyro.sample("xs", dist.Normal(torch.zeros(dim - 1, dtype=D64), torch.exp(0.5 * x0)).to_event(1))

    return Target(
        name="funnel10", dim=dim, potential=potential, log_z=0.0, sample=sample, model=model, model_args=(),
        description=(
            "Neal's funnel in 10-D: x0 ~ N(0, 3^2), x_i | x0 ~ N(0, exp(x0)) (variance exp(x0)) for i = 1..9; "
            "normalised, log Z = 0. Flat vector [x0, x1..x9] = sites ('x0', 'xs'). Same density as the OSDS / "
            "Beyond-ELBOs `funnel.py`; unlike that code, `sample` does not clip draws to [-30, 30]."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=("x0",) + tuple(f"x{i}" for i in range(1, dim)),
    )


# ---------------------------------------------------------------------------------------------------
# Mixtures


class _RealVectorMixture(dist.MixtureSameFamily):
    """:class:`~pyro.distributions.MixtureSameFamily` of components supported on all of R^d, with its support
    declared as ``real_vector`` (torch's mixture constraint has no ``biject_to``, so Pyro could not
    initialise the site otherwise)."""

    support = dist.constraints.real_vector


def _gaussian_mixture(name: str, locs: torch.Tensor, std: float, description: str,
                      weights: torch.Tensor | None = None) -> Target:
    k, dim = locs.shape
    shapes = {"x": (dim,)}
    to_sites, from_sites = _packing(shapes)
    weights = torch.full((k,), 1.0 / k, dtype=D64) if weights is None else weights.to(D64)
    log_weights = weights.log()
    log_norm = dim * (math.log(std) + 0.5 * LOG_2PI)

    def potential(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, dim)
        sq = ((x[:, None, :] - locs.to(x.dtype)) ** 2).sum(-1)  # (batch, k)
        return -torch.logsumexp(-0.5 * sq / std**2 + log_weights.to(x.dtype), dim=-1) + log_norm

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(weights, n, replacement=True, generator=generator)
        return locs[idx] + std * torch.randn(n, dim, dtype=D64, generator=generator)

    def model():
        mix = dist.Categorical(probs=weights)
        comp = dist.Normal(locs, torch.full_like(locs, std)).to_event(1)
        pyro.sample("x", _RealVectorMixture(mix, comp))

    return Target(name=name, dim=dim, potential=potential, log_z=0.0, sample=sample, model=model, model_args=(),
                  description=description, to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes),
                  modes=locs, mode_weights=weights)


def _gmm9_2d() -> Target:
    grid = torch.tensor([-5.0, 0.0, 5.0], dtype=D64)
    locs = torch.cartesian_prod(grid, grid)
    return _gaussian_mixture(
        "gmm9_2d", locs, math.sqrt(0.3),
        "Mixture of 9 equal-weight Gaussians N(mu_k, 0.3 I) in 2-D, means on the grid {-5, 0, 5}^2 (the SCDS "
        "paper's GMM, arXiv 2502.07579); normalised, log Z = 0. Flat vector = site 'x'.",
    )


def _gmm40_50d() -> Target:
    gen = torch.Generator().manual_seed(0)
    locs = torch.rand(40, 50, dtype=D64, generator=gen) * 80.0 - 40.0
    return _gaussian_mixture(
        "gmm40_50d", locs, 1.0,
        "Mixture of 40 equal-weight Gaussians N(mu_k, I) in 50-D, mu_k ~ U[-40, 40]^50 drawn with "
        "torch.Generator().manual_seed(0) (torch.rand(40, 50) * 80 - 40, float64); normalised, log Z = 0. The "
        "OSDS / Beyond-ELBOs `gmm40.py` draws the means with jax.random.PRNGKey(0), so its means (and hence its "
        "mode geometry) differ from these; the family and the scale (loc_scaling 40, unit covariances) are the "
        "same. Flat vector = site 'x'.",
    )


def _gmm40_2d() -> Target:
    gen = torch.Generator().manual_seed(0)
    locs = torch.rand(40, 2, dtype=D64, generator=gen) * 80.0 - 40.0
    return _gaussian_mixture(
        "gmm40_2d", locs, 1.0,
        "The OSDS paper's GMM40 in 2-D: 40 equal-weight Gaussians N(mu_k, I), mu_k ~ U[-40, 40]^2 drawn with "
        "torch.Generator().manual_seed(0) (torch.rand(40, 2) * 80 - 40, float64); normalised, log Z = 0. Some means "
        "lie closer than 2 sd, so they share one mode of the density. Flat vector = site 'x'.",
    )


def _two_modes(weight: float, separation: float, dim: int) -> Target:
    locs = torch.zeros(2, dim, dtype=D64)
    locs[0, 0], locs[1, 0] = -0.5 * separation, 0.5 * separation
    name = f"two_modes_w{round(100 * weight)}_s{round(separation)}_{dim}d"
    return _gaussian_mixture(
        name, locs, 1.0,
        f"Two unit-variance Gaussians in {dim}-D with weights {weight} / {1 - weight}, their means {separation} sd "
        "apart along the first axis (at -/+ half of it); normalised, log Z = 0. Flat vector = site 'x'.",
        weights=torch.tensor([weight, 1.0 - weight], dtype=D64),
    )


def _mixture_model(num_components: int) -> Target:
    r"""A Bayesian mixture model whose posterior has K! label-switching modes, with log Z by enumeration."""
    K, sigma, tau = num_components, 1.0, 5.0
    centres = {2: [-2.5, 2.5], 3: [-4.0, 0.0, 4.0]}[K]
    offsets = torch.tensor([-0.6, -0.2, 0.25, 0.55], dtype=D64)[: 12 // K]
    y = torch.cat([c + offsets for c in centres])  # 4 points per cluster: 8 (K = 2) or 12 (K = 3)
    n = y.numel()
    shapes = {"locs": (K,)}
    to_sites, from_sites = _packing(shapes)

    def log_joint(locs: torch.Tensor) -> torch.Tensor:
        prior = _normal_log_prob(locs, tau).sum(-1)
        comp = -0.5 * ((y[None, :, None] - locs[:, None, :].to(D64)) / sigma) ** 2 - math.log(sigma) - 0.5 * LOG_2PI
        return prior + torch.logsumexp(comp - math.log(K), -1).sum(-1)

    def potential(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, K)
        return -log_joint(x)

    # exact log Z: sum over all K^n assignments of the conjugate Gaussian marginal likelihood of each group
    assignments = torch.cartesian_prod(*[torch.arange(K)] * n) if n > 1 else torch.arange(K)[:, None]
    one_hot = torch.nn.functional.one_hot(assignments, K).to(D64)  # (K^n, n, K)
    counts = one_hot.sum(1)
    sums = (one_hot * y[None, :, None]).sum(1)
    squares = (one_hot * (y**2)[None, :, None]).sum(1)
    precision = 1.0 / tau**2 + counts / sigma**2
    log_marg = (-0.5 * counts * math.log(2 * math.pi * sigma**2) - 0.5 * torch.log(tau**2 * precision)
                - 0.5 * squares / sigma**2 + 0.5 * (sums / sigma**2) ** 2 / precision).sum(-1)
    log_z = float(torch.logsumexp(log_marg, 0)) - n * math.log(K)

    # the posterior's modes: the K! permutations of the sorted cluster means (by symmetry, equal masses)
    perms = torch.tensor(list(itertools.permutations(range(K))))
    base = torch.tensor(centres, dtype=D64) * (1 - sigma**2 / (n / K * tau**2 + sigma**2))
    modes = base[perms]

    def model(y):
        locs = pyro.sample("locs", dist.Normal(torch.zeros(K, dtype=D64), tau).to_event(1))
        with pyro.plate("data", y.shape[0]):
            mix = dist.Categorical(logits=torch.zeros(K, dtype=D64))
            pyro.sample("obs", dist.MixtureSameFamily(mix, dist.Normal(locs, sigma)), obs=y)

    return Target(
        name=f"mixture_model_k{K}", dim=K, potential=potential, log_z=log_z, sample=None, model=model,
        model_args=(y,),
        description=(
            f"A Bayesian mixture of {K} Gaussians with equal weights and known sd {sigma}: locs_k ~ N(0, {tau}^2) iid, "
            f"y_i ~ sum_k N(locs_k, {sigma}^2) / {K}, {n} points in {K} clusters at {centres}. The posterior is "
            f"invariant under the {math.factorial(K)} permutations of the labels (label switching), so it has "
            f"{math.factorial(K)} symmetric modes. log Z exactly, by summing the conjugate marginal likelihood over "
            f"all {K}^{n} assignments. Flat vector = site 'locs'."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes), modes=modes,
        mode_weights=torch.full((len(perms),), 1.0 / len(perms), dtype=D64),
    )


def _student_t_mixture_50d() -> Target:
    k, dim, df, scale = 10, 50, 2.0, 1.0
    gen = torch.Generator().manual_seed(0)
    locs = torch.rand(k, dim, dtype=D64, generator=gen) * 20.0 - 10.0
    shapes = {"x": (dim,)}
    to_sites, from_sites = _packing(shapes)
    # log density of a standard-form Student-t with df, scale: c - (df + 1)/2 log(1 + z^2 / df)
    log_c = math.lgamma(0.5 * (df + 1)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi) - math.log(scale)

    def potential(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, dim)
        z2 = ((x[:, None, :] - locs.to(x.dtype)) / scale) ** 2  # (batch, k, dim)
        comp = (log_c - 0.5 * (df + 1) * torch.log1p(z2 / df)).sum(-1)
        return -(torch.logsumexp(comp, dim=-1) - math.log(k))

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(k, (n,), generator=generator)
        # t_df = N(0,1) / sqrt(chi2_df / df), chi2_df as a sum of df squared normals (integer df)
        z = torch.randn(n, dim, dtype=D64, generator=generator)
        chi2 = (torch.randn(int(df), n, dim, dtype=D64, generator=generator) ** 2).sum(0)
        return locs[idx] + scale * z / torch.sqrt(chi2 / df)

    def model():
        mix = dist.Categorical(logits=torch.zeros(k, dtype=D64))
        comp = dist.StudentT(torch.full_like(locs, df), locs, torch.full_like(locs, scale)).to_event(1)
        pyro.sample("x", _RealVectorMixture(mix, comp))

    return Target(
        name="student_t_mixture_50d", dim=dim, potential=potential, log_z=0.0, sample=sample, model=model,
        model_args=(),
        description=(
            "Mixture of 10 equal-weight product Student-t components in 50-D (df 2, scale 1), locations "
            "U[-10, 10]^50 drawn with torch.Generator().manual_seed(0) (torch.rand(10, 50) * 20 - 10, float64); "
            "normalised, log Z = 0. The OSDS `student_t_mixture.py` draws its locations with JAX's PRNG (seed 0), so "
            "the locations differ. Flat vector = site 'x'."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes),
    )


# ---------------------------------------------------------------------------------------------------
# Many-well

_MW_A, _MW_B, _MW_C = -0.5, -6.0, 1.0  # E(d) = a d + b d^2 + c d^4, density of d proportional to exp(-E(d))


def _double_well_energy(d: torch.Tensor) -> torch.Tensor:
    return _MW_A * d + _MW_B * d**2 + _MW_C * d**4


def _double_well_grid(num: int = 200_001, half_width: float = 4.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid, density divided by its maximum, and the log of that maximum, for one double-well coordinate
    (exp(-E) is below e^-110 times its peak beyond |d| = 4)."""
    d = torch.linspace(-half_width, half_width, num, dtype=D64)
    log_f = -_double_well_energy(d)
    return d, torch.exp(log_f - log_f.max()), log_f.max()


def many_well_log_z_1d(num: int = 200_001) -> float:
    r"""
    :math:`\log\int e^{-E(d)}\,dd` for :math:`E(d) = -0.5d - 6d^2 + d^4` by the trapezoidal rule
    (spectrally accurate for this smooth, super-exponentially decaying integrand; the value is
    :math:`\log 11784.50927`).

    :param int num: number of grid points on [-4, 4].
    :return: the log normaliser of one double-well coordinate.
    """
    d, f, shift = _double_well_grid(num)
    return float(torch.log(torch.trapezoid(f, d)) + shift)


def _many_well32() -> Target:
    dim, pairs = 32, 16
    shapes = {"x": (dim,)}
    to_sites, from_sites = _packing(shapes)
    log_z = pairs * (many_well_log_z_1d() + 0.5 * LOG_2PI)

    def pair_energy(x: torch.Tensor) -> torch.Tensor:
        d, v = x[..., 0::2], x[..., 1::2]
        return (_double_well_energy(d) + 0.5 * v**2).sum(-1)

    def potential(x: torch.Tensor) -> torch.Tensor:
        _check_batch(x, dim)
        return pair_energy(x)

    @functools.cache
    def cdf_table() -> tuple[torch.Tensor, torch.Tensor]:
        d, f, _ = _double_well_grid()
        cdf = torch.cat([torch.zeros(1, dtype=D64), torch.cumsum(0.5 * (f[1:] + f[:-1]) * (d[1:] - d[:-1]), 0)])
        return d, cdf / cdf[-1]

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        # d by inverse CDF of a piecewise-linear interpolation of the trapezoidal CDF (grid step 4e-5);
        # v ~ N(0, 1) exactly.
        grid, cdf = cdf_table()
        u = torch.rand(n, pairs, dtype=D64, generator=generator)
        i = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
        t = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1]).clamp_min(1e-300)
        d = grid[i - 1] + t * (grid[i] - grid[i - 1])
        v = torch.randn(n, pairs, dtype=D64, generator=generator)
        return torch.stack([d, v], dim=-1).reshape(n, dim)

    def model():
        # A standard-normal base measure lets Pyro initialise the site; the factor replaces it by exp(-U):
        # log N(x; 0, I) + factor = -U exactly.
        x = pyro.sample("x", dist.Normal(torch.zeros(dim, dtype=D64), 1.0).to_event(1))
        base = -0.5 * (x**2).sum(-1) - 0.5 * dim * LOG_2PI
        pyro.factor("many_well", -pair_energy(x) - base)

    return Target(
        name="many_well32", dim=dim, potential=potential, log_z=log_z, sample=sample, model=model, model_args=(),
        description=(
            "Many-well in 32-D: 16 independent 2-D double wells on the pairs (d, v) = (x_{2i}, x_{2i+1}), "
            "U = sum_i [E(d_i) + v_i^2 / 2] with E(d) = -0.5 d - 6 d^2 + d^4 (a = -0.5, b = -6, c = 1; the density "
            "exp(-E) puts its heavier well at d > 0); unnormalised, log Z = 16 (log 11784.50927 + 0.5 log 2 pi) "
            "= 164.69568 (1-D integral by quadrature). Same density as the OSDS / Beyond-ELBOs `many_well.py` "
            "(2^16 modes). The flip d -> -d leaves log Z unchanged, so log Z alone cannot detect a sign error in "
            "the linear term. `sample` draws d by inverse CDF on a grid of step 4e-5 (not bit-exact, error far "
            "below Monte-Carlo error); the paper code has no sampler. Pyro model: site 'x' with a N(0, I) base "
            "measure plus a factor, so the Pyro potential equals U exactly."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes),
    )


# ---------------------------------------------------------------------------------------------------
# Bayesian logistic regressions


def _logistic_regression(name: str, loader: Callable, note: str) -> Target:
    X, y = loader()
    n, dim = X.shape
    shapes = {"w": (dim,)}
    to_sites, from_sites = _packing(shapes)

    def potential(w: torch.Tensor) -> torch.Tensor:
        _check_batch(w, dim)
        eta = w @ X.to(w.dtype).T  # (batch, n)
        # log Bernoulli(y | sigmoid(eta)) = y eta - softplus(eta)
        log_lik = (y.to(w.dtype) * eta - F.softplus(eta)).sum(-1)
        log_prior = -0.5 * (w**2).sum(-1) - 0.5 * dim * LOG_2PI
        return -(log_lik + log_prior)

    def model(X: torch.Tensor, y: torch.Tensor):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
        pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)

    return Target(
        name=name, dim=dim, potential=potential, log_z=None, sample=None, model=model, model_args=(X, y),
        description=(
            f"Bayesian logistic regression on {name} ({n} observations, {dim - 1} features + intercept): "
            "w ~ N(0, I), y_n ~ Bernoulli(sigmoid(x_n . w)), X column-standardised (mean 0, population sd 1, "
            "sd 0 -> 1) with a leading column of ones (pyro_osds.datasets loader). U contains all normalising "
            "constants, so log Z = log p(y) (proper evidence). Flat vector = site 'w' (w[0] = intercept). " + note
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes),
    )


def _ionosphere() -> Target:
    return _logistic_regression(
        "ionosphere", load_ionosphere,
        "Same density as the OSDS / Beyond-ELBOs `ionosphere.py` (numpyro model). Feature 2 (w[2]) is constant in "
        "the data, so its posterior equals the N(0, 1) prior.",
    )


def _sonar() -> Target:
    return _logistic_regression("sonar", load_sonar, "Same density as the OSDS / Beyond-ELBOs `sonar.py`.")


def _german_credit() -> Target:
    return _logistic_regression(
        "german_credit", load_german_credit,
        "y = 1 for bad credit. DIFFERS from the OSDS / Beyond-ELBOs `german_credit.py` on purpose: that code scales "
        "the features without centring, uses p(y=1) = sigmoid(-x . w) (a reflection w -> -w) and samples the "
        "likelihood alone (its N(0, 10^2) prior is commented out, a flat improper prior). We use the proper, "
        "standardised N(0, I) model, so log Z is a genuine evidence and not comparable with the paper's numbers.",
    )


def _breast_cancer() -> Target:
    return _logistic_regression(
        "breast_cancer", load_breast_cancer,
        "y = 1 benign. DIFFERS from the OSDS / Beyond-ELBOs `breast_cancer.py` on purpose: that code scales the "
        "features without centring, uses p(y=1) = sigmoid(-x . w) and samples the likelihood alone (flat prior); "
        "the data are linearly separable, so that target is improper (log Z = +inf). We use the proper, "
        "standardised N(0, I) model.",
    )


# ---------------------------------------------------------------------------------------------------
# Seeds


def _seeds() -> Target:
    data = load_seeds()
    r, n, x1, x2 = data["r"], data["n"], data["x1"], data["x2"]
    plates = r.shape[0]
    shape_tau, rate_tau, scale_a = 0.01, 0.01, 10.0
    shapes = {"a0": (), "a1": (), "a12": (), "a2": (), "b": (plates,), "tau": ()}
    to_sites, from_sites = _packing(shapes)
    dim = 4 + plates + 1
    log_binom = torch.lgamma(n + 1) - torch.lgamma(r + 1) - torch.lgamma(n - r + 1)
    gamma_const = shape_tau * math.log(rate_tau) - math.lgamma(shape_tau)

    def potential(z: torch.Tensor) -> torch.Tensor:
        _check_batch(z, dim)
        a0, a1, a12, a2 = z[:, 0:1], z[:, 1:2], z[:, 2:3], z[:, 3:4]
        b, u = z[:, 4:4 + plates], z[:, -1]
        tau = torch.exp(u)
        # log Gamma(tau; shape, rate) + log|d tau / d u| = const + shape * u - rate * tau
        lp = gamma_const + shape_tau * u - rate_tau * tau
        lp = lp + _normal_log_prob(z[:, 0:4], scale_a).sum(-1)
        # b_j ~ N(0, 1 / tau)
        lp = lp + (-0.5 * tau[:, None] * b**2 + 0.5 * u[:, None] - 0.5 * LOG_2PI).sum(-1)
        eta = a0 + a1 * x1 + a2 * x2 + a12 * x1 * x2 + b
        # log Binomial(r | n, sigmoid(eta)) = log C(n, r) + r eta - n softplus(eta)
        lp = lp + (log_binom + r * eta - n * F.softplus(eta)).sum(-1)
        return -lp

    def model(r: torch.Tensor, n: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor):
        zero = torch.tensor(0.0, dtype=r.dtype)
        tau = pyro.sample("tau", dist.Gamma(torch.tensor(shape_tau, dtype=r.dtype), rate_tau))
        a0 = pyro.sample("a0", dist.Normal(zero, scale_a))
        a1 = pyro.sample("a1", dist.Normal(zero, scale_a))
        a2 = pyro.sample("a2", dist.Normal(zero, scale_a))
        a12 = pyro.sample("a12", dist.Normal(zero, scale_a))
        b = pyro.sample("b", dist.Normal(torch.zeros(r.shape[0], dtype=r.dtype), tau.rsqrt()).to_event(1))
        logits = a0 + a1 * x1 + a2 * x2 + a12 * x1 * x2 + b
        pyro.sample("r", dist.Binomial(total_count=n, logits=logits).to_event(1), obs=r)

    return Target(
        name="seeds", dim=dim, potential=potential, log_z=None, sample=None, model=model, model_args=(r, n, x1, x2),
        description=(
            "Seeds random-effects logistic regression (Crowder 1978, BUGS 'Seeds'): tau ~ Gamma(shape 0.01, rate "
            "0.01); a0, a1, a2, a12 ~ N(0, 10^2); b_j ~ N(0, 1/tau), j = 1..21; r_j ~ Binomial(n_j, sigmoid(a0 + "
            "a1 x1_j + a2 x2_j + a12 x1_j x2_j + b_j)) INCLUDING the binomial coefficients (sum_j log C(n_j, r_j) = "
            "488.1736 is part of log Z). Flat vector [a0, a1, a12, a2, b_1..b_21, log tau] (sorted site names; "
            "tau on the log scale with its Jacobian) = the numpyro ravel order of the OSDS / Beyond-ELBOs "
            "`seeds.py`, whose density (numpyro BinomialLogits, also with the coefficients) is the same."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes, {"tau": "log_tau"}),
    )


# ---------------------------------------------------------------------------------------------------
# Brownian motion


def _brownian() -> Target:
    y_all = load_brownian_motion()
    steps = y_all.shape[0]
    observed = torch.nonzero(~torch.isnan(y_all)).squeeze(-1)
    y_obs = y_all[observed]
    prior_scale = 2.0
    shapes = {"innovation_noise_scale": (), "observation_noise_scale": (), "x": (steps,)}
    to_sites, from_sites = _packing(shapes)
    dim = steps + 2
    walk_tril = torch.tril(torch.ones(steps, steps, dtype=D64))

    def potential(z: torch.Tensor) -> torch.Tensor:
        _check_batch(z, dim)
        u_innov, u_obs, x = z[:, 0], z[:, 1], z[:, 2:]
        s_innov, s_obs = torch.exp(u_innov), torch.exp(u_obs)
        # LogNormal(0, 2) on a scale, written in log-space with the Jacobian, is N(u; 0, 2^2)
        lp = _normal_log_prob(u_innov, prior_scale) + _normal_log_prob(u_obs, prior_scale)
        steps_ = torch.cat([x[:, :1], x[:, 1:] - x[:, :-1]], dim=1)  # x_0 - 0, x_t - x_{t-1}
        lp = lp + (-0.5 * (steps_ / s_innov[:, None]) ** 2 - u_innov[:, None] - 0.5 * LOG_2PI).sum(-1)
        resid = (x[:, observed] - y_obs.to(z.dtype)) / s_obs[:, None]
        lp = lp + (-0.5 * resid**2 - u_obs[:, None] - 0.5 * LOG_2PI).sum(-1)
        return -lp

    def model(y_obs: torch.Tensor, observed: torch.Tensor):
        s_innov = pyro.sample("innovation_noise_scale", dist.LogNormal(torch.tensor(0.0, dtype=D64), prior_scale))
        s_obs = pyro.sample("observation_noise_scale", dist.LogNormal(torch.tensor(0.0, dtype=D64), prior_scale))
        # Gaussian random walk from 0: x = s_innov * L eps with L the lower-triangular matrix of ones
        x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(steps, dtype=D64), scale_tril=s_innov * walk_tril))
        pyro.sample("y", dist.Normal(x[..., observed], s_obs).to_event(1), obs=y_obs)

    return Target(
        name="brownian", dim=dim, potential=potential, log_z=None, sample=None, model=model,
        model_args=(y_obs, observed),
        description=(
            "Brownian motion with unknown scales and missing middle observations (inference-gym "
            "BrownianMotionUnknownScalesMissingMiddleObservations): sigma_innov, sigma_obs ~ LogNormal(0, 2); "
            "x_0 ~ N(0, sigma_innov^2); x_t ~ N(x_{t-1}, sigma_innov^2), t = 1..29; y_t ~ N(x_t, sigma_obs^2) for "
            "the 20 observed t (t = 10..19 missing). Flat vector [log sigma_innov, log sigma_obs, x_0..x_29] "
            "(sorted site names 'innovation_noise_scale', 'observation_noise_scale', 'x'), scales on the LOG scale "
            "with the log-Jacobian. The OSDS / Beyond-ELBOs `brownian.py` uses inference-gym's softplus bijector "
            "for the scales (same vector order), so its flat density differs, but log Z does not depend on the "
            "bijector. Pyro model writes the walk as one MultivariateNormal site with scale_tril = sigma_innov * "
            "(lower-triangular ones), whose density equals the random-walk density."
        ),
        to_sites=to_sites, from_sites=from_sites,
        labels=("log_sigma_innov", "log_sigma_obs") + tuple(f"x[{t}]" for t in range(steps)),
    )


# ---------------------------------------------------------------------------------------------------
# Gamma-Poisson: a product of skewed posteriors with an exact log Z


def _gamma_poisson(dim: int) -> Target:
    shape, rate = 2.0, 1.0
    gen = torch.Generator().manual_seed(dim)
    lam = torch._standard_gamma(torch.full((dim,), shape, dtype=D64), generator=gen) / rate
    y = torch.poisson(lam, generator=gen)
    shapes = {"rate": (dim,)}
    to_sites, from_sites = _packing(shapes)
    # log p(y) = sum_i log NegativeBinomial(y_i; shape, rate / (rate + 1))
    log_z = float((torch.lgamma(y + shape) - math.lgamma(shape) - torch.lgamma(y + 1)
                   + shape * math.log(rate / (rate + 1)) - y * math.log(rate + 1)).sum())
    post_shape, post_rate = y + shape, rate + 1.0
    const = float((shape * math.log(rate) - math.lgamma(shape) - torch.lgamma(y + 1)).sum())

    def potential(u: torch.Tensor) -> torch.Tensor:
        _check_batch(u, dim)
        # Gamma prior on the log scale with its Jacobian times the Poisson likelihood: sum (a + y) u - (b + 1) e^u
        return -(const + (post_shape.to(u.dtype) * u - post_rate * u.exp()).sum(-1))

    def sample(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        gamma = torch._standard_gamma(post_shape.expand(n, dim).contiguous(), generator=generator) / post_rate
        return gamma.log()

    def model(y: torch.Tensor):
        with pyro.plate("counts", y.shape[0]):
            lam = pyro.sample("rate", dist.Gamma(torch.tensor(shape, dtype=y.dtype), rate))
            pyro.sample("y", dist.Poisson(lam), obs=y)

    return Target(
        name=f"gamma_poisson{dim}", dim=dim, potential=potential, log_z=log_z, sample=sample, model=model,
        model_args=(y,),
        description=(
            f"{dim} independent counts y_i ~ Poisson(rate_i), rate_i ~ Gamma(shape 2, rate 1), the counts drawn from "
            "this prior (seed = dim). Each posterior is Gamma(2 + y_i, 2), skewed on the log scale Pyro samples in "
            "(an exponential left tail, a doubly exponential right one): a product of 1-D problems whose exact "
            "map is coordinate-wise. log Z exact (negative-binomial marginals). Flat vector: log rate."
        ),
        to_sites=to_sites, from_sites=from_sites, labels=_labels(shapes, {"rate": "log_rate"}),
    )


# ---------------------------------------------------------------------------------------------------
# Registry

_BUILDERS: dict[str, Callable[[], Target]] = {
    "funnel10": _funnel10,
    "gmm9_2d": _gmm9_2d,
    "gmm40_50d": _gmm40_50d,
    "gmm40_2d": _gmm40_2d,
    **{f"two_modes_w{round(100 * w)}_s{s}_{d}d": functools.partial(_two_modes, w, float(s), d)
       for w in (0.3, 0.1) for s in (6, 10) for d in (2, 10)},
    "mixture_model_k2": functools.partial(_mixture_model, 2),
    "mixture_model_k3": functools.partial(_mixture_model, 3),
    "student_t_mixture_50d": _student_t_mixture_50d,
    "many_well32": _many_well32,
    "ionosphere": _ionosphere,
    "sonar": _sonar,
    "german_credit": _german_credit,
    "breast_cancer": _breast_cancer,
    "seeds": _seeds,
    "brownian": _brownian,
    "gamma_poisson64": functools.partial(_gamma_poisson, 64),
    "gamma_poisson256": functools.partial(_gamma_poisson, 256),
}

#: Names of the targets whose log Z is only known numerically (``benchmarks/references.json``), smallest first.
BAYESIAN_TARGETS = ("german_credit", "seeds", "breast_cancer", "brownian", "ionosphere", "sonar")


@functools.cache
def get_target(name: str) -> Target:
    """
    The target called ``name`` (built on first use, then cached).

    :param str name: one of ``list(TARGETS)``.
    :return: the :class:`Target`.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; choose one of {sorted(_BUILDERS)}") from None
    return builder()


class _Registry(Mapping):
    """Read-only ``{name: Target}`` mapping that builds targets lazily through :func:`get_target`."""

    def __getitem__(self, name: str) -> Target:
        return get_target(name)

    def __iter__(self) -> Iterator[str]:
        return iter(_BUILDERS)

    def __len__(self) -> int:
        return len(_BUILDERS)

    def __repr__(self) -> str:
        return f"TARGETS({list(_BUILDERS)})"


#: All targets by name, built on first access.
TARGETS: Mapping[str, Target] = _Registry()
