# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Conditionally Gaussian sites drawn whitened (:mod:`pyro_osds.ops.conditional`).

A model whose potential is quadratic in some latent sites given the others (Gaussian random effects with a Gaussian
likelihood under learned scales, a linear-Gaussian state-space model with unknown noise, the centred eight schools)
has an exactly Gaussian conditional for them. :class:`WhitenedTarget` is the model's flat target in the coordinates
:math:`(s, \varepsilon)` in which that conditional is standard normal: its potential is the exact change of
variables, every reported value (``get_samples()``, ArviZ, deterministic sites, log-likelihoods) is the model's own
at :math:`(s, x(s, \varepsilon))`, and the sampler only has to learn the marginal of the other sites. The
parameterisation choice (:func:`~pyro_osds.reparam.choose_parameterization`) takes it when its mean-field ELBO is
higher than the form it would otherwise keep.

* :func:`conditionally_gaussian_sites`: the latent sites (at most ``whitening_max_dim`` coordinates coupled together,
  see :class:`~pyro_osds.reparam.NoncenteringConfig`; a plate of independent groups may hold any number) in which
  the potential is jointly quadratic at points around the initial point, with a positive definite curvature there and a cost of at most :data:`MAX_COLOURS` gradient rows
  per draw (a sparse curvature, as a random walk's, costs three whatever its length);
* :func:`log_concave_sites`: with ``whitening="laplace"``, those and the vector-valued sites whose conditional is
  log-concave at those points (random effects under a logistic, binomial or Poisson likelihood), which
  :class:`WhitenedTarget` draws in their Laplace form: :math:`m(s)` the conditional mode by damped Newton steps,
  :math:`C(s)` the factor of the curvature there (:func:`~pyro_osds.ops.conditional.conditional_gaussian`), the same
  exact change of variables; what the Gaussian misses of the conditional is left to the flow;
* :class:`WhitenedTarget`: the target in whitened coordinates.
"""

from __future__ import annotations

import threading

import torch

from .ops.conditional import WhiteningBlock, independent_groups, is_quadratic, unwhiten, whiten, whitened_potential
from .ops.jacobian import potential_score_hessian
from .target import FlatTarget
from .util import raise_device_errors, seeded_generator

__all__ = ["WhitenedTarget", "conditionally_gaussian_sites", "log_concave_sites", "within_limits"]

#: points around the initial point at which a block must be quadratic
NUM_CHECK_POINTS = 4
#: the seed of the points at which the curvature's sparsity is read
PATTERN_SEED = 1974
#: rows mapped at once between the whitened and the model's coordinates (each takes a block's gradient rows)
CHUNK_SIZE = 1024
#: the most colours of a whitened block's curvature columns (:func:`~pyro_osds.ops.conditional.colour_columns`):
#: each costs one more gradient row per draw in every evaluation of the whitened potential
MAX_COLOURS = 16
#: the most damped Newton steps (each a reading of the curvature) of a block that is not quadratic (its Laplace
#: form; fewer once every draw is at its conditional mode)
NEWTON_STEPS = 8


def within_limits(block: WhiteningBlock, max_dim: int) -> bool:
    """Whether a block costs at most :data:`MAX_COLOURS` gradient rows per reading and couples at most ``max_dim``
    coordinates together (:attr:`~pyro_osds.ops.conditional.WhiteningBlock.group_size`)."""
    return block.num_colours <= MAX_COLOURS and block.group_size <= max_dim


def _check_points(target: FlatTarget, seed: int, *, around_init: bool = True) -> torch.Tensor:
    """:data:`NUM_CHECK_POINTS` points ``init + N(0, I)`` (or ``N(0, I)``), from a generator seeded with ``seed``."""
    generator = seeded_generator(target.init.device, seed)
    noise = torch.randn(NUM_CHECK_POINTS, target.dim, dtype=torch.float64, device=generator.device,
                        generator=generator).to(dtype=target.dtype, device=target.device)
    return target.init + noise if around_init else noise


def _indices(target: FlatTarget, sites) -> list[int]:
    """The flat coordinates of ``sites``, in the target's site order."""
    return [i for site in target.sites if site.name in sites for i in range(site.start, site.stop)]


def _reference(target: FlatTarget, index: list[int]) -> torch.Tensor:
    """:math:`x_0` of a block: zero, fixed whatever the initial point (which Pyro's init strategy draws from the
    global random stream), so a run reloaded later or elsewhere applies the map its weights were computed for."""
    return target.init.new_zeros(len(index))


def conditionally_gaussian_sites(target: FlatTarget, *, max_dim: int = 64, seed: int = 0,
                                 exclude=()) -> tuple[str, ...]:
    """
    The latent sites of ``target`` (not those in ``exclude``) in which its potential is jointly quadratic
    (:func:`~pyro_osds.ops.conditional.is_quadratic` at :data:`NUM_CHECK_POINTS` points ``init + N(0, I)``), with a
    positive definite curvature at every point, at most :data:`MAX_COLOURS` colours of its columns (the gradient rows
    each evaluation of the whitened potential costs per draw) and at most ``max_dim`` coordinates coupled together (a
    block-diagonal curvature, a plate of random effects given their scale, may hold any number of such groups,
    :func:`~pyro_osds.ops.conditional.independent_groups`); ``()`` if none. Sites are taken one by one while the
    union qualifies, in site order and largest first, keeping the one with more coordinates (site order on a tie):
    a hierarchy's location taken first would couple a thousand effects into one block, taken last it stays outside.
    """
    points = _check_points(target, seed)
    generator = seeded_generator(target.init.device, seed + 1)
    curvature = _Curvature(target, points)

    def admits(index: list[int]) -> bool:
        try:  # a potential that fails at a perturbed point (a Cholesky of the model's own) has no block here
            if not is_quadratic(target.potential, points, index, generator=generator):
                return False
        except (RuntimeError, ValueError) as err:
            raise_device_errors(err)
            return False
        return curvature.admits(index, max_dim)

    sites = [site for site in target.sites if site.name not in exclude]
    chosen = max((_greedy(target, order, admits) for order in (sites, _largest_first(sites))),
                 key=lambda names: len(_indices(target, names)))  # the first (site order) on a tie
    return tuple(site.name for site in target.sites if site.name in chosen)


def _largest_first(sites: list) -> list:
    """``sites`` by decreasing size, in site order among equals."""
    return sorted(sites, key=lambda site: site.start - site.stop)


def _greedy(target: FlatTarget, sites, admits, start=()) -> list[str]:
    """``start`` and the ``sites`` added one by one while ``admits`` the union's coordinates."""
    chosen = list(start)
    for site in sites:
        if admits(_indices(target, chosen + [site.name])):
            chosen.append(site.name)
    return chosen


def log_concave_sites(target: FlatTarget, start=(), *, max_dim: int = 64, seed: int = 0,
                      exclude=()) -> tuple[str, ...]:
    """
    ``start`` (the quadratic sites, :func:`conditionally_gaussian_sites`) and the vector-valued latent sites (random
    effects, fields; a scalar hyper-parameter coupled to all of them would cost a colour and slow the Newton steps:
    on Seeds, whitening three scalar coefficients with the effects took the mean-field ELBO from -75.99 to -76.61,
    the Newton iterates swinging) added to it, largest first, while the union's curvature is positive definite at the points of :func:`conditionally_gaussian_sites`
    (a log-concave conditional there: random effects under a logistic or Poisson likelihood), with at most
    ``max_dim`` coordinates coupled together and :data:`MAX_COLOURS` colours, and at least one coordinate is left
    outside it (whitening every coordinate is the preconditioner's affine map, not a conditional); in site order. Such a block is drawn in its
    Laplace form (:class:`WhitenedTarget`).
    """
    curvature = _Curvature(target, _check_points(target, seed))
    vectors = _largest_first([site for site in target.sites
                              if site.stop - site.start > 1 and site.name not in start and site.name not in exclude])
    chosen = _greedy(target, vectors, lambda index: len(index) < target.dim and curvature.admits(index, max_dim),
                     start)
    return tuple(site.name for site in target.sites if site.name in chosen)


class _Curvature:
    """The potential's Hessian at check points, read once for every block tried."""

    def __init__(self, target: FlatTarget, points: torch.Tensor):
        self.target, self.points, self._hessian = target, points, None

    def admits(self, index: list[int], max_dim: int) -> bool:
        """Whether the block ``index`` has a finite, positive definite curvature at every point, at most
        :data:`MAX_COLOURS` colours and at most ``max_dim`` coordinates coupled together (the size of its groups,
        :attr:`~pyro_osds.ops.conditional.WhiteningBlock.group_size`)."""
        if self._hessian is None:
            try:  # a potential that fails at a perturbed point (a Cholesky of the model's own) has no block here
                self._hessian = potential_score_hessian(self.target.potential, self.points)[2]
            except (RuntimeError, ValueError) as err:
                raise_device_errors(err)
                self._hessian = torch.full((1, 1, 1), torch.nan, device=self.points.device)
        if self._hessian.shape[-1] != self.target.dim:
            return False
        select = torch.as_tensor(index, dtype=torch.long, device=self._hessian.device)
        hessian = self._hessian[:, select][:, :, select]
        if not bool(torch.isfinite(hessian).all()) or not bool((torch.linalg.cholesky_ex(hessian)[1] == 0).all()):
            return False
        pattern = _pattern(hessian)
        if len(index) > max_dim:  # only as independent groups: decided before the colourings (O(d^2) each)
            groups = independent_groups(pattern | pattern.T)[1]
            if groups == 1 or len(index) // groups > max_dim:
                return False
        return within_limits(WhiteningBlock.of(self.target.dim, index, _reference(self.target, index), pattern), max_dim)


def _pattern(hessian: torch.Tensor) -> torch.Tensor:
    """Where curvatures ``(P, d, d)`` are non-zero at any point (relative to their largest entry)."""
    return (hessian.abs() > 1e-12 * hessian.abs().amax()).any(0)


def _hessian_at(target: FlatTarget, points: torch.Tensor, index: list[int]) -> torch.Tensor:
    """The curvature ``(P, d, d)`` of the coordinates ``index`` at ``points`` ``(P, D)``: their block of the
    potential's Hessian (:func:`~pyro_osds.ops.jacobian.potential_score_hessian`, as the mode search reads it)."""
    index = torch.as_tensor(index, dtype=torch.long, device=points.device)
    return potential_score_hessian(target.potential, points)[2][:, index][:, :, index]


def _sparsity(target: FlatTarget, index: list[int]) -> torch.Tensor | None:
    """Where the block's curvature is non-zero at any of :data:`NUM_CHECK_POINTS` fixed points ``N(0, I)`` (not
    around the initial point: the same pattern on every load; ``None``, dense, if not finite there): a zero at every
    point is a zero of the model's structure (a random walk's steps couple neighbours only)."""
    try:
        hessian = _hessian_at(target, _check_points(target, PATTERN_SEED, around_init=False), index)
    except (RuntimeError, ValueError) as err:
        raise_device_errors(err)
        return None
    return _pattern(hessian) if bool(torch.isfinite(hessian).all()) else None


def _quadratic(target: FlatTarget, index: list[int]) -> bool:
    """Whether the potential is quadratic in the coordinates ``index`` at :data:`NUM_CHECK_POINTS` fixed points
    ``N(0, I)`` (as :func:`_sparsity`, the same answer on every load); a potential that fails there: not."""
    generator = seeded_generator(target.init.device, PATTERN_SEED + 1)
    try:
        return is_quadratic(target.potential, _check_points(target, PATTERN_SEED, around_init=False), index,
                            generator=generator)
    except (RuntimeError, ValueError) as err:
        raise_device_errors(err)
        return False


_CALLS = threading.local()  # the model evaluations of this thread's last call of a Laplace block's potential


def _last_evaluations() -> int:
    """The model evaluations of this thread's last :meth:`WhitenedTarget.potential` call of a Laplace block."""
    return getattr(_CALLS, "evaluations", 0)


class WhitenedTarget(FlatTarget):
    r"""
    ``base`` (a :class:`~pyro_osds.model.ModelTarget`) with the sites ``sites`` whitened given the others (module
    docstring). The flat layout is ``base``'s, the coordinates of ``sites`` hold :math:`\varepsilon`; everything a
    draw is reported by (:meth:`constrain`, :meth:`unpack`, :meth:`deterministic`, :meth:`log_likelihood`,
    :meth:`add_discrete`, :meth:`sample_discrete`) maps it to ``base``'s coordinates first, and every other attribute
    is ``base``'s. A draw's potential is :math:`U'`, the density of the whitened coordinates (ArviZ's ``lp``), as a
    non-centred model's is that of its standardised values. The map is fixed by the sites and the model alone
    (:math:`x_0 = 0`, the sparsity read at fixed points), so a reloaded run applies the map of its weights.
    """

    def __init__(self, base: FlatTarget, sites):
        self.base = base
        self.whitened_sites = tuple(site.name for site in base.sites if site.name in sites)  # the site order
        index = _indices(base, self.whitened_sites)
        newton_steps = 1 if _quadratic(base, index) else NEWTON_STEPS
        self.block = WhiteningBlock.of(base.dim, index, _reference(base, index), _sparsity(base, index),
                                       newton_steps=newton_steps)
        self.noncentered_sites = base.noncentered_sites
        # U'(s, eps) = |eps|^2 / 2 + g(s): exactly for a quadratic block (where its curvature is positive definite),
        # to second order at the conditional mode for a Laplace block; the mode search holds eps at 0
        self.gaussian_start, self.standard_coordinates = None, self.block.x_index
        # the model's initial point, mapped (putting the whitened sites at their conditional mean instead, eps = 0,
        # makes the choice's mean-field fit of this form converge, so the choice takes the whitening wherever it is
        # better, also where it only costs: a 7-D linear regression fitted in 15.6 s instead of 4.7 s, both right)
        self.init = self.from_base(base.init)
        #: model evaluations per row of :meth:`potential` (per reading of the curvature one gradient per colour of
        #: its columns and one at the point read; then the value): a quadratic block's one reading; a Laplace
        #: block's Newton steps stop once converged, and its evaluations are counted call by call
        #: (:attr:`last_evaluations`), this the most (its readings, the last step's gradient and the value)
        if newton_steps == 1:
            self.evaluations_per_row = self.block.num_colours + 2
        else:
            self.evaluations_per_row = (newton_steps + 1) * (self.block.num_colours + 1) + 2
            self.last_evaluations = _last_evaluations

    def __getattr__(self, name):
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def potential(self, z: torch.Tensor) -> torch.Tensor:
        if self.last_evaluations is None:
            return whitened_potential(self.base.potential, z, self.block)
        rows = 0

        def counted(x: torch.Tensor) -> torch.Tensor:
            nonlocal rows
            rows += x.shape[0]
            return self.base.potential(x)

        out = whitened_potential(counted, z, self.block)
        _CALLS.evaluations = rows
        return out

    def to_base(self, z: torch.Tensor) -> torch.Tensor:
        """Whitened ``(N, D)`` (or ``(D,)``) -> ``base``'s coordinates, :data:`CHUNK_SIZE` rows at a time."""
        if z.dim() == 1:
            return self.to_base(z.unsqueeze(0))[0]
        with torch.no_grad():
            return torch.cat([unwhiten(self.base.potential, chunk, self.block)[0].detach()
                              for chunk in z.split(CHUNK_SIZE)]) if z.shape[0] else z.detach()

    def from_base(self, z: torch.Tensor) -> torch.Tensor:
        """``base``'s coordinates ``(N, D)`` (or ``(D,)``) -> whitened, :data:`CHUNK_SIZE` rows at a time."""
        if z.dim() == 1:
            return self.from_base(z.unsqueeze(0))[0]
        return torch.cat([whiten(self.base.potential, chunk, self.block) for chunk in z.split(CHUNK_SIZE)]) \
            if z.shape[0] else z.detach()

    def pack(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.from_base(self.base.pack(params))

    def unpack(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.unpack(self.to_base(z))

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.constrain(self.to_base(z))

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.from_base(self.base.unconstrain(values))

    def deterministic(self, z: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.base.deterministic(self.to_base(z), *args, **kwargs)

    def log_likelihood(self, z: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.base.log_likelihood(self.to_base(z), *args, **kwargs)

    def sample_discrete(self, z: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.base.sample_discrete(self.to_base(z), *args, **kwargs)

    def add_discrete(self, draws: list, distributed=None) -> list:
        based = self.base.add_discrete([d._replace(x=self.to_base(d.x)) for d in draws], distributed)
        return [b._replace(x=d.x) for b, d in zip(based, draws, strict=True)]
