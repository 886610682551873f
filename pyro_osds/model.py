# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Pyro model :math:`\to` flat unconstrained target on :math:`\mathbb R^D` (the
:class:`~pyro_osds.target.FlatTarget` contract; the only module that traces Pyro models).

:class:`ModelTarget` builds, from ``(model, args, kwargs)``:

* the latent continuous sites in Pyro's sorted order, their ``biject_to(support)`` transforms and
  the packing between site dicts and ``(batch, D)`` tensors (as :class:`pyro.infer.MCMC` does);
* a **batched** potential :math:`U(z) = -\log p(x(z), y) - \sum_s \log|\det \partial x_s/\partial z_s|`
  tried in this order, each verified against Pyro's own ``potential_fn`` on a probe batch
  (:meth:`~pyro_osds.target.FlatTarget.select_vectorization`):

  1. ``"vmap"``: :func:`torch.func.vmap` over a trace+condition potential (validation off);
  2. ``"plate"``: an outer particle plate, which also marginalises enumerable discrete sites
     (as NUTS does) by tensor contraction;
  3. ``"loop"``: a Python loop over Pyro's ``potential_fn`` (slow; a warning says so);

* pointwise log-likelihoods of the observed sites (for ``az.loo``), and discrete-site draws
  recovered afterwards with :func:`~pyro.infer.infer_discrete`.

Non-enumerable discrete latent sites and subsample plates are refused with an error that names the
site and the fix.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive, config_enumerate, infer_discrete
from pyro.infer.autoguide.initialization import init_to_median
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.uncondition_messenger import UnconditionMessenger
from pyro.poutine.util import site_is_subsample

from .distributed import DistributedContext, broadcast_object
from .inputs import UnsupportedModelError, check_model, is_computed, nonfinite_arguments
from .reparam import NoncenteringConfig, choose_parameterization
from .target import FlatTarget, PotentialTarget, Site
from .util import check_choice

__all__ = ["ModelTarget", "UnsupportedModelError", "build_target", "posterior_predictive", "sample_discrete"]

PARTICLE_PLATE = "_osds_particles"


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _first_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (list, tuple)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


class _UnconditionSites(UnconditionMessenger):
    """:class:`~pyro.poutine.uncondition_messenger.UnconditionMessenger` for the named sites only (not for the
    ``pyro.deterministic`` sites, which Pyro also records as observed)."""

    def __init__(self, sites):
        super().__init__()
        self.sites = frozenset(sites)

    def _pyro_sample(self, msg):
        if msg["name"] in self.sites:
            super()._pyro_sample(msg)


class ModelTarget(FlatTarget):
    r"""
    The flat unconstrained target of a Pyro model (module docstring).

    :param model: a Pyro model (callable).
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param int max_plate_nesting: as in :class:`~pyro.infer.NUTS` (guessed if ``None``).
    :param init_strategy: Pyro init strategy for the starting point (default: the point of lowest potential
        among ``init_to_median`` and :attr:`NUM_UNIFORM_INITS` draws of Pyro MCMC's default ``init_to_uniform``,
        uniform on :math:`(-2, 2)` in the unconstrained space; the medians of a vague scale prior such as
        ``Gamma(0.01, 0.01)`` put the random effects it scales at :math:`10^8`).
    :param dict transforms: optional site -> transform (constrained to unconstrained) overrides.
    :param str vectorize: force ``"vmap"``, ``"plate"`` or ``"loop"``; default tries them in order.
    :param dict initial_params: optional unconstrained starting values ``{site: tensor}`` (as for
        :class:`~pyro.infer.MCMC`), checked against the latent sites.
    """

    METHODS = ("vmap", "plate", "loop")
    #: uniform draws that compete with the prior medians for the default initial point
    NUM_UNIFORM_INITS = 8
    site_kind = "latent site"
    _not_finite_message = ("The model's potential is not finite near its initial point; check the model's priors "
                           "and likelihood, or pass `initial_params` / `init_strategy`.")

    def __init__(
        self,
        model,
        model_args=(),
        model_kwargs=None,
        *,
        max_plate_nesting: int | None = None,
        init_strategy=None,
        transforms: dict | None = None,
        vectorize: str | None = None,
        initial_params: dict | None = None,
    ):
        check_choice("vectorize", vectorize, self.METHODS + (None,))
        self.model = model
        self.args = tuple(model_args)
        self.kwargs = dict(model_kwargs or {})
        self.trace = check_model(model, self.args, self.kwargs, transforms)
        if max_plate_nesting is None:  # the deepest vectorised plate of the model's trace, as Pyro guesses it
            dims = [frame.dim for site in self.trace.nodes.values() if site["type"] == "sample"
                    for frame in site["cond_indep_stack"] if frame.vectorized]
            max_plate_nesting = -min(dims) if dims else 0
        self.max_plate_nesting = int(max_plate_nesting)
        default_init = init_strategy is None
        init_strategy = init_to_median(num_samples=15) if default_init else init_strategy
        if transforms:  # Pyro's initialize_model makes none for the sites left out of a given dict
            transforms = {**_support_transforms(self.trace, skip=transforms), **transforms}
        try:
            with pyro.validation_enabled(False):
                init_params, self._pyro_potential, self.transforms, self.prototype_trace = initialize_model(
                    model, self.args, self.kwargs, transforms=transforms, max_plate_nesting=self.max_plate_nesting,
                    init_strategy=init_strategy,
                )
        except ValueError as err:
            if "cannot find valid initial params" not in str(err):
                raise
            nonfinite = nonfinite_arguments(self.args, self.kwargs)
            raise ValueError(
                "The model's potential is NaN or infinite at every initial point tried (100 draws of the init "
                "strategy), so there is nothing to sample: "
                + (f"the model's data hold non-finite values ({'; '.join(nonfinite)}); drop or impute them."
                   if nonfinite else "check the likelihood and priors for impossible values (e.g. observations "
                   "outside a distribution's support, a factor of -inf), or pass finite `initial_params`.")
            ) from err
        self.enumerated_sites = [
            name for name, site in self.trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and site["fn"].has_enumerate_support
        ]
        #: ``pyro.deterministic`` sites and sites reparameterised by ``poutine.reparam``
        #: (:func:`~pyro_osds.inputs.is_computed`): Pyro records them as observed sample sites; they are functions of
        #: the latent sites, reported with the posterior, never as data or likelihood
        self.deterministic_sites = [
            name for name, site in self.trace.nodes.items() if site["type"] == "sample" and is_computed(site)
        ]
        #: the observed sites, the data and pointwise likelihoods of ``az.loo``: not the ``pyro.deterministic``
        #: sites, nor the ``pyro.factor`` sites (auxiliary, with no data: a factor adds to the density, which may be
        #: a prior's or a likelihood's term)
        self.observed_sites = [
            name for name, site in self.trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
            and name not in self.deterministic_sites and not site["infer"].get("is_auxiliary", False)
        ]
        sites, start = [], 0
        for name in sorted(init_params):
            value = init_params[name]
            proto = self.prototype_trace.nodes[name]
            numel = value.numel()
            sites.append(Site(name, value.shape, start, start + numel, proto["value"].shape,
                              len(proto["fn"].batch_shape)))
            start += numel
        self.sites = sites
        if not sites:  # nothing to sample: the potential is -log p(y), summed over any enumerated sites
            data = _first_tensor(list(self.args) + list(self.kwargs.values()))
            floating = data is not None and data.is_floating_point()
            self.init = torch.zeros(0, dtype=data.dtype if floating else torch.get_default_dtype(),
                                    device=data.device if data is not None else torch.get_default_device())
            if initial_params:
                self._check_initial_params(initial_params)  # names the unknown sites
            self._potentials, self.vectorize = {"constant": self._constant_potential}, "constant"
            return
        self.init = self.pack({k: v.unsqueeze(0) for k, v in init_params.items()})[0].detach()
        if initial_params is not None:
            self.init = self._check_initial_params(initial_params)
        self._potentials = {"vmap": self._vmap_potential, "plate": self._plate_potential, "loop": self._loop_potential}
        self.vectorize = self._select(vectorize)
        if default_init and initial_params is None:
            self.init = self._lowest_initial_point(self.init)

    def _constant_potential(self, z: torch.Tensor) -> torch.Tensor:
        """The potential of a model without continuous latent sites at ``z`` ``(batch, 0)``: one value."""
        return self._pyro_potential({}).to(self.dtype).expand(z.shape[0])

    def _lowest_initial_point(self, init: torch.Tensor) -> torch.Tensor:
        """The point of lowest potential among ``init`` and :attr:`NUM_UNIFORM_INITS` uniform draws on (-2, 2)
        (from a fixed generator: the choice depends on the model only and leaves the global seed alone)."""
        generator = torch.Generator(device=init.device).manual_seed(0)
        uniform = torch.rand(self.NUM_UNIFORM_INITS, init.numel(), dtype=init.dtype, device=init.device,
                             generator=generator)
        candidates = torch.cat([init.unsqueeze(0), 4.0 * uniform - 2.0])
        with torch.no_grad():
            potential = torch.nan_to_num(self.potential(candidates), nan=math.inf)
        return candidates[int(torch.argmin(potential))].clone()

    def _check_initial_params(self, initial_params: dict) -> torch.Tensor:
        """Validates user ``initial_params`` (unconstrained values of the latent sites, as for MCMC)."""
        if not isinstance(initial_params, dict):
            raise TypeError(f"`initial_params` must be a dict {{site: unconstrained tensor}}, got "
                            f"{type(initial_params).__name__}.")
        names = [s.name for s in self.sites]
        unknown = sorted(set(initial_params) - set(names))
        if unknown or set(initial_params) != set(names):
            raise ValueError(f"`initial_params` must give every latent site {names} (unconstrained); got "
                             f"{sorted(initial_params)}" + (f", unknown {unknown}." if unknown else "."))
        for s in self.sites:
            v = initial_params[s.name]
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise TypeError(f"`initial_params[{s.name!r}]` must be a floating point tensor, got "
                                f"{getattr(v, 'dtype', type(v).__name__)}.")
            if tuple(v.shape) != tuple(s.shape):
                raise ValueError(f"`initial_params[{s.name!r}]` must have the site's unconstrained shape "
                                 f"{tuple(s.shape)}, got {tuple(v.shape)}.")
        init = self.pack({k: v.detach().to(self.dtype).unsqueeze(0) for k, v in initial_params.items()})[0]
        with torch.no_grad():
            value = self._loop_potential(init.unsqueeze(0))
        if not bool(torch.isfinite(value).all()):
            raise ValueError("The model's potential is not finite at `initial_params`; pass a point inside the "
                             "posterior's support (in unconstrained space).")
        return init

    # ------------------------------------------------------------------------------------------
    # potentials
    def _log_jacobian(self, values, params, batch: int | None) -> torch.Tensor:
        total = 0.0
        for s in self.sites:
            ladj = self.transforms[s.name].log_abs_det_jacobian(values[s.name], params[s.name])
            total = total + (ladj.sum() if batch is None else ladj.reshape(batch, -1).sum(-1))
        return total

    def _conditioned_trace(self, flat: torch.Tensor, discrete: dict | None = None):
        """The model's trace conditioned on one flat unconstrained vector ``(D,)`` (and on the values of
        ``discrete`` sites); returns ``(trace, params, values)`` (unconstrained and constrained site values)."""
        params = {s.name: flat[s.start : s.stop].reshape(s.shape) for s in self.sites}
        values = {name: self.transforms[name].inv(u) for name, u in params.items()}
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, {**values, **(discrete or {})})).get_trace(
                *self.args, **self.kwargs)
        return trace, params, values

    def _single_potential(self, flat: torch.Tensor) -> torch.Tensor:
        trace, params, values = self._conditioned_trace(flat)
        return -trace.log_prob_sum() + self._log_jacobian(values, params, None)

    def _vmap_potential(self, z: torch.Tensor) -> torch.Tensor:
        with pyro.validation_enabled(False):
            return torch.func.vmap(self._single_potential)(z)

    def _plate_values(self, z: torch.Tensor):
        batch = z.shape[0]
        params = self.unpack(z)
        values, aligned = {}, {}
        for s in self.sites:
            x = self.transforms[s.name].inv(params[s.name])
            values[s.name] = x
            pad = (1,) * (self.max_plate_nesting - s.batch_ndim)
            aligned[s.name] = x.reshape((batch,) + pad + tuple(s.constrained_shape))
        return params, values, aligned

    def _plate_trace(self, aligned: dict, batch: int, enumerate_sites: bool, *, sample_discrete: bool = False
                     ) -> poutine.Trace:
        """The model's trace at ``batch`` particles (``aligned`` values, in an outer particle plate): with its
        enumerable sites enumerated (``enumerate_sites``), or drawn from their exact conditional given each particle
        (``sample_discrete``: :func:`~pyro.infer.infer_discrete` at temperature 1, forward-filtering
        backward-sampling along ``pyro.markov`` chains)."""
        model = poutine.condition(self.model, aligned)
        if enumerate_sites and not sample_discrete:
            model = poutine.enum(config_enumerate(model), first_available_dim=-self.max_plate_nesting - 2)
        inner = config_enumerate(model) if sample_discrete else model

        def particle_model(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, batch, dim=-self.max_plate_nesting - 1):
                return inner(*args, **kwargs)

        if sample_discrete:
            particle_model = infer_discrete(particle_model, first_available_dim=-self.max_plate_nesting - 2,
                                            temperature=1)
        with poutine.block(), pyro.validation_enabled(False):
            return poutine.trace(particle_model).get_trace(*self.args, **self.kwargs)

    def _plate_log_joint(self, trace: poutine.Trace, batch: int) -> torch.Tensor:
        trace.compute_log_prob()
        if not self.enumerated_sites:
            total = 0.0
            ndim = self.max_plate_nesting + 1  # the particle dim sits at -ndim
            for site in trace.nodes.values():
                if site["type"] == "sample" and not site_is_subsample(site):
                    lp = site["log_prob"]
                    if lp.dim() < ndim:
                        lp = lp.reshape((1,) * (ndim - lp.dim()) + tuple(lp.shape))
                    lp = lp.movedim(-ndim, 0)
                    total = total + lp.expand((batch,) + tuple(lp.shape[1:])).reshape(batch, -1).sum(-1)
            return total
        trace.pack_tensors()
        log_factors = OrderedDict()
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site_is_subsample(site):
                ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
                log_factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
        enum_dims = set(trace.symbol_to_dim) - set(trace.plate_to_symbol.values())
        particle = trace.plate_to_symbol[PARTICLE_PLATE]
        result = contract_to_tensor(log_factors, enum_dims, target_ordinal=frozenset({particle}))
        return result.reshape(batch)

    def _plate_potential(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[0] == 1:
            # a particle plate of size 1 is dropped by Pyro's tensor packing: evaluate two copies
            return self._plate_potential(z.expand(2, -1))[:1]
        batch = z.shape[0]
        params, values, aligned = self._plate_values(z)
        trace = self._plate_trace(aligned, batch, bool(self.enumerated_sites))
        return -self._plate_log_joint(trace, batch) + self._log_jacobian(values, params, batch)

    def _loop_potential(self, z: torch.Tensor) -> torch.Tensor:
        out = []
        with pyro.validation_enabled(False):
            for row in z:
                out.append(self._pyro_potential({s.name: row[s.start : s.stop].reshape(s.shape) for s in self.sites}))
        return torch.stack(out).reshape(z.shape[0])

    def pyro_potential(self, z: torch.Tensor) -> torch.Tensor:
        """Pyro's own (unbatched) ``potential_fn`` evaluated row by row: the reference."""
        return self._loop_potential(z)

    def _select(self, forced: str | None) -> str:
        probe = self.probe_points()
        with torch.no_grad():
            reference = self.pyro_potential(probe)
        candidates = [m for m in ("vmap", "plate") if not (m == "vmap" and self.enumerated_sites)]
        return self.select_vectorization(candidates, probe, reference, forced=forced)

    def _fallback_warning(self, reasons: dict) -> str:
        return ("The model could not be vectorised over particles ("
                + "; ".join(f"{k}: {v}" for k, v in reasons.items())
                + "), so OSDS evaluates it in a Python loop, which is slow. Writing the model with broadcasting "
                "(e.g. `(X * w.unsqueeze(-2)).sum(-1)` instead of `X @ w` inside plates, `Vindex` for enumerated "
                "indexing) and without Python control flow on latent values makes it vectorisable.")

    # ------------------------------------------------------------------------------------------
    # observations, log-likelihood and discrete sites
    def observed_data(self) -> dict[str, torch.Tensor]:
        return {name: self.trace.nodes[name]["value"].detach() for name in self.observed_sites}

    def _pointwise(self, site) -> torch.Tensor:
        fn, value = site["fn"], site["value"]
        while isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        lp = fn.log_prob(value)
        return lp

    def _per_draw(self, z: torch.Tensor, values_of, chunk_size: int, discrete: dict | None = None
                  ) -> dict[str, torch.Tensor]:
        """``values_of(trace) -> {name: tensor}`` of the model's trace conditioned on every draw of ``z``
        ``(N, D)`` (and on the ``discrete`` site values ``{site: (N, ...)}``, if given), stacked to
        ``{name: (N, ...)}``; batched with :func:`torch.func.vmap` when the model's potential is."""
        out: dict[str, list] = {}
        for start in range(0, z.shape[0], chunk_size):
            chunk = z[start : start + chunk_size]
            with torch.no_grad(), pyro.validation_enabled(False):
                if self.vectorize == "vmap" and not discrete:
                    rows = [torch.func.vmap(lambda flat: values_of(self._conditioned_trace(flat)[0]))(chunk)]
                else:
                    rows = []
                    for i, row in enumerate(chunk):
                        trace = self._conditioned_trace(
                            row, {k: v[start + i] for k, v in (discrete or {}).items()})[0]
                        rows.append({k: v.unsqueeze(0) for k, v in values_of(trace).items()})
            for res in rows:
                for name, value in res.items():
                    out.setdefault(name, []).append(value)
        return {name: torch.cat(v).detach() for name, v in out.items()}

    def log_likelihood(self, z: torch.Tensor, chunk_size: int = 1024) -> dict[str, torch.Tensor]:
        r"""
        Pointwise log-likelihood of each observed site at draws ``z`` ``(N, D)``:
        ``{site: (N, *obs_shape)}`` (``.to_event`` dims are kept pointwise). Models with enumerated
        discrete sites are not supported here (returns an empty dict with a warning).
        """
        if self.enumerated_sites:
            warnings.warn("Pointwise log-likelihoods are not computed for models with enumerated discrete sites.",
                          UserWarning, stacklevel=2)
            return {}
        return self._per_draw(
            z, lambda trace: {name: self._pointwise(trace.nodes[name]) for name in self.observed_sites}, chunk_size)

    def deterministic(self, z: torch.Tensor, discrete: dict | None = None, chunk_size: int = 1024, *,
                      sites=None) -> dict[str, torch.Tensor]:
        r"""
        The ``pyro.deterministic`` sites (or those of them named in ``sites``) at draws ``z`` ``(N, D)`` (given the
        enumerated sites' draws ``discrete``, ``{site: (N, ...)}``, for models that have them): ``{site: (N, *shape)}``.
        """
        names = self.deterministic_sites if sites is None else [s for s in self.deterministic_sites if s in sites]
        if not names:
            return {}
        return self._per_draw(z, lambda trace: {name: trace.nodes[name]["value"] for name in names}, chunk_size,
                              discrete)

    def sample_discrete(self, z: torch.Tensor, chunk_size: int = 256) -> dict[str, torch.Tensor]:
        """Draws of the enumerated discrete sites from their exact conditional given each continuous draw ``z``
        (:func:`sample_discrete`). Returns ``{site: (N, *shape)}``."""
        return sample_discrete(self, z, chunk_size)

    def add_discrete(self, draws: list, distributed: DistributedContext | None = None) -> list:
        """``draws`` (one :class:`~pyro_osds.results.Draws` per chain, as many each) with draws of the enumerated
        discrete sites given each draw (:meth:`sample_discrete`; rank 0's on every rank of a process group)."""
        if not self.enumerated_sites:
            return draws
        n = draws[0].x.shape[0]
        discrete = None
        if distributed is None or distributed.is_main:
            discrete = self.sample_discrete(torch.cat([d.x for d in draws]))
        if distributed is not None:
            discrete = broadcast_object(discrete, distributed)
        return [d._replace(discrete={k: v[i * n:(i + 1) * n] for k, v in discrete.items()})
                for i, d in enumerate(draws)]


def sample_discrete(target: ModelTarget, z: torch.Tensor, chunk_size: int = 256) -> dict[str, torch.Tensor]:
    r"""
    Draws the enumerated discrete sites of ``target`` from their exact conditional given each continuous draw ``z``
    ``(N, D)``, with :func:`~pyro.infer.infer_discrete` (temperature 1; forward filtering, backward sampling along
    ``pyro.markov`` chains): ``chunk_size`` draws at once in a particle plate when the model's potential is
    vectorised by one (:attr:`~pyro_osds.target.FlatTarget.vectorize` ``"plate"``), else one draw at a time (a model
    that indexes with ``locs[k]`` rather than ``Vindex(locs)[..., k]`` does not batch). Returns
    ``{site: (N, *shape)}``.
    """
    if not target.enumerated_sites:
        return {}
    out: dict[str, list] = {name: [] for name in target.enumerated_sites}
    m, batched = target.max_plate_nesting, target.vectorize == "plate"
    for chunk in z.split(chunk_size if batched else 1):
        if batched:
            batch = max(chunk.shape[0], 2)  # a particle plate of size 1 would be dropped: draw for two copies
            trace = target._plate_trace(target._plate_values(chunk.expand(batch, -1))[2], batch, True,
                                        sample_discrete=True)
        else:
            cond = {k: v[0] for k, v in target.constrain(chunk).items()}
            model = infer_discrete(config_enumerate(poutine.condition(target.model, cond)), first_available_dim=-m - 1,
                                   temperature=1)
            with poutine.block(), pyro.validation_enabled(False):
                trace = poutine.trace(model).get_trace(*target.args, **target.kwargs)
        for name in target.enumerated_sites:
            shape = tuple(target.trace.nodes[name]["value"].shape)
            value = trace.nodes[name]["value"].detach()
            if not batched:
                out[name].append(value.reshape((1,) + shape))
                continue
            # the particle dim sits left of the model's plates: move it first, broadcast to the site's shape
            value = value.reshape((1,) * (m + 1 - value.dim()) + tuple(value.shape)).movedim(-m - 1, 0)
            value = value.expand((batch,) + (1,) * (m - len(shape)) + shape).reshape((batch,) + shape)
            out[name].append(value[: chunk.shape[0]])
    return {name: torch.cat(v) for name, v in out.items()}


def posterior_predictive(target: ModelTarget, samples: dict, args: tuple, kwargs: dict, *,
                         return_sites: list | None = None, parallel: bool = False) -> dict[str, torch.Tensor]:
    r"""The model of ``target`` called with ``(args, kwargs)`` once at each posterior draw of ``samples`` (``{site:
    (N, ...)}``) by :class:`pyro.infer.Predictive`, its observed sites sampled (as :func:`pyro.poutine.uncondition`
    does): replicated data :math:`\tilde y \sim p(\tilde y \mid y)` at ``return_sites`` (default: the observed
    sites)."""
    sites = list(target.observed_sites) if return_sites is None else list(return_sites)
    if not sites:
        raise ValueError("The model has no observed sites to predict; name the sites with `return_sites`.")
    model = _UnconditionSites(target.observed_sites)(target.model)
    predictive = Predictive(model, posterior_samples=samples, return_sites=sites, parallel=parallel)
    with poutine.block():
        return {name: v.detach() for name, v in predictive(*args, **kwargs).items()}


def _support_transforms(trace, skip=()) -> dict:
    """``biject_to(support).inv`` of every continuous latent site of ``trace`` but those in ``skip`` (what Pyro makes
    when it is given no transforms at all)."""
    return {name: torch.distributions.biject_to(site["fn"].support).inv for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not site["fn"].has_enumerate_support and name not in skip}


def build_target(model=None, potential_fn=None, args=(), kwargs=None, *, initial_params=None, transforms=None,
                 batched_potential: bool = False, max_plate_nesting=None, init_strategy=None,
                 device=None, noncentering: NoncenteringConfig | None = None) -> tuple[FlatTarget, tuple, dict]:
    """
    The flat target of ``model`` called with ``(args, kwargs)`` (moved to ``device`` when given), in the
    parameterisation ``noncentering`` chooses (:func:`~pyro_osds.reparam.choose_parameterization`; default: as
    written), or of ``potential_fn`` (which takes no arguments). Returns ``(target, args, kwargs)``, the arguments
    as the target uses them.
    """
    kwargs = dict(kwargs or {})
    if model is not None:
        if device is not None:
            args, kwargs = _map_tensors(args, lambda t: t.to(device)), _map_tensors(kwargs, lambda t: t.to(device))

        def make_target(m):
            return ModelTarget(m, args, kwargs, max_plate_nesting=max_plate_nesting, init_strategy=init_strategy,
                               transforms=transforms, initial_params=initial_params)

        fixed = list(initial_params or {}) + list(transforms or {})
        as_written = NoncenteringConfig("none", whitening="none")
        target, sites, start = choose_parameterization(model, args, kwargs, noncentering or as_written, make_target,
                                                       fixed_sites=fixed)
        target.noncentered_sites, target.gaussian_start = sites, start
        return target, tuple(args), kwargs
    if args or kwargs:
        raise TypeError("`run()` takes no model arguments when OSDS wraps a `potential_fn`.")
    params = initial_params
    if device is not None and isinstance(params, dict):
        params = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
    return PotentialTarget(potential_fn, params, transforms=transforms, batched=batched_potential), (), {}
