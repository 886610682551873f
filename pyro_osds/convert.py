# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
OSDS results as ArviZ data, built with plain :mod:`xarray` (no ArviZ needed to build them).

:func:`to_datatree` returns an :class:`xarray.DataTree`, the ArviZ >= 1 data model (also consumed by
``arviz-base``/``arviz-stats`` 0.8 on Python 3.11); :func:`to_inference_data` returns an
``arviz.InferenceData`` when ArviZ 0.x is installed and the DataTree otherwise (in ArviZ >= 1
``InferenceData`` *is* ``DataTree``).

Groups:

``posterior``
    **equally weighted** posterior draws (default ``resample=True``): each chain's weighted draws resampled in
    proportion to their importance weights (systematic resampling, the copies of a draw adjacent), constrained,
    dims ``(chain, draw, <site>_dim_<i>)``, with the ``pyro.deterministic`` sites and the draws of enumerated
    discrete sites. ArviZ's ``summary``, ``hdi``, ``plot_*`` and ``loo`` then estimate the *posterior*; the
    autocorrelation ESS ArviZ reports sees the copies, so it follows the weights' Kish ESS, not the draw count.
``sample_stats``
    ``lp`` :math:`= -U(z)` of the posterior draws (the unnormalised log joint in the unconstrained space,
    i.e. including the log-Jacobian of the constraining transforms), and per chain (dim ``chain``)
    ``log_marginal_likelihood``, its ``_se``, the Kish ``ess_kish`` and the Pareto ``pareto_k`` of the weights
    (the pooled values are the group's attributes).
``weighted_posterior`` / ``weighted_sample_stats``
    the raw draws of the sampler :math:`q` (same layout as ``posterior``) with ``lp``, ``log_q`` and
    ``log_weight`` :math:`= \mathrm{lp} - \log q` (the exact importance log-weight), for users who weight
    draws themselves (``az.extract(..., group="weighted_posterior")``; PSIS on ``log_weight``).
``log_likelihood``
    pointwise log-likelihood of each observed site at the posterior draws, ``(chain, draw, *obs_dims)``
    (models only; ``pyro.deterministic`` sites are never here).
``observed_data``
    the observed values (models only).
``posterior_predictive``
    when ``posterior_predictive=`` is given (:meth:`~pyro_osds.OSDS.predictive`): replicated data at the
    posterior draws.

With ``resample=False`` the ``posterior`` holds the raw weighted draws and ``sample_stats`` their ``lp``,
``log_q`` and ``log_weight`` (the default before the 0.1 release): ArviZ's statistics of them are then those of the
sampler, not of the posterior.

Root attributes: ``log_marginal_likelihood`` and ``log_marginal_likelihood_se`` (pooled over
chains), ``elbo``, ``ess``, ``pareto_k``, ``num_folded``, ``num_lost_modes``, ``too_many_modes``,
``log_marginal_likelihood_reliable`` (1 when :attr:`~pyro_osds.results.LogEvidence.reliable`, 0 when the
evidence must not be trusted), ``resampled``, the method, the number of flow steps, the log-det method and the
settings.

Note that ``arviz_stats``' ``psislw`` follows the LOO convention and expects *log-likelihoods*: pass
``-log_weight`` to it (ArviZ 0.x's ``az.psislw`` takes the log-weights themselves).
"""

from __future__ import annotations

import json

import numpy as np
import torch
import xarray as xr

from ._version import __version__
from .util import tensor_on_its_device

__all__ = ["to_datatree", "to_inference_data"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.bool else t.to(torch.float64).numpy() if t.is_floating_point() else t.numpy()


def _dataset(values: dict[str, np.ndarray], lead: tuple[str, ...], coords: dict | None, dims: dict | None,
             attrs: dict, sizes: tuple[int, ...] = ()) -> xr.Dataset:
    """The arrays ``values`` ``(*lead, ...)`` as a dataset; with no values, the ``lead`` dimensions of ``sizes``
    alone (the posterior of a model with nothing to sample)."""
    data_vars, all_coords = {}, {}
    for name, arr in values.items():
        extra = list((dims or {}).get(name, []))
        shape = arr.shape[len(lead):]
        if len(extra) > len(shape):
            raise ValueError(f"`dims[{name!r}]` names {len(extra)} dims but the site has {len(shape)}.")
        names = extra + [f"{name}_dim_{i}" for i in range(len(extra), len(shape))]
        for d, size in zip(names, shape, strict=True):
            if coords and d in coords:
                all_coords[d] = coords[d]
            elif d not in all_coords:
                all_coords[d] = np.arange(size)
        data_vars[name] = (lead + tuple(names), arr)
    lead_sizes = next(iter(values.values())).shape[: len(lead)] if values else sizes
    for d, n in zip(lead, lead_sizes, strict=True):
        all_coords[d] = np.arange(n)
    return xr.Dataset(data_vars, coords=all_coords, attrs=attrs)


def _lead(values: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, np.ndarray]:
    """``values`` ``{name: (C*N, ...)}`` at the pooled-draw ``index`` ``(C, M)``, as ``(C, M, ...)`` arrays."""
    flat = index.reshape(-1)
    return {name: _numpy(v[flat.to(v.device)].reshape(tuple(index.shape) + tuple(v.shape[1:])))
            for name, v in values.items()}


def _predictive_arrays(samples: dict, num_chains: int, num_draws: int) -> dict[str, np.ndarray]:
    """Posterior predictive draws ``{site: (C*M, ...) or (C, M, ...)}`` as ``(C, M, ...)`` arrays."""
    out = {}
    for name, value in samples.items():
        value = tensor_on_its_device(value)
        if value.shape[:2] == (num_chains, num_draws):
            out[name] = _numpy(value)
        elif value.dim() >= 1 and value.shape[0] == num_chains * num_draws:
            out[name] = _numpy(value.reshape((num_chains, num_draws) + tuple(value.shape[1:])))
        else:
            raise ValueError(
                f"`posterior_predictive[{name!r}]` has shape {tuple(value.shape)}; expected ({num_chains}, "
                f"{num_draws}, ...) or ({num_chains * num_draws}, ...), one value per posterior draw (use "
                "`osds.predictive(...)`, which draws at the posterior draws).")
    return out


def to_datatree(osds, *, resample: bool = True, log_likelihood: bool = True, posterior_predictive: dict | None = None,
                coords: dict | None = None, dims: dict | None = None) -> xr.DataTree:
    r"""
    The results of a fitted :class:`~pyro_osds.OSDS` as an :class:`xarray.DataTree` (module
    docstring).

    :param bool resample: ``posterior`` holds equally weighted posterior draws (default: the weighted draws
        resampled per chain, :meth:`~pyro_osds.OSDS.get_samples`), and the raw draws with their weights go to
        ``weighted_posterior`` / ``weighted_sample_stats``; ``False`` puts the raw weighted draws in
        ``posterior`` (ArviZ's statistics of them are then those of the sampler, not of the posterior).
    :param bool log_likelihood: compute the pointwise log-likelihood group (models only).
    :param dict posterior_predictive: posterior predictive draws at the posterior draws
        (:meth:`~pyro_osds.OSDS.predictive`), ``{site: (chains * draws, ...)}``, for the
        ``posterior_predictive`` group.
    :param dict coords: extra coordinates, ``{dim_name: values}``.
    :param dict dims: dimension names per variable, ``{var_name: [dim, ...]}``.
    """
    evidence = osds.log_evidence()  # raises unless there are draws
    draws, target = osds.draws, osds.target
    num_chains, num_draws = len(draws), draws[0].x.shape[0]
    flat = torch.cat([d.x for d in draws])  # (C*N, D), chain-major
    raw = torch.arange(num_chains * num_draws, device="cpu").reshape(num_chains, num_draws)
    index = osds.draw_indices(group_by_chain=True, resample=True) if resample else raw
    values = dict(sorted(target.constrain(flat).items()))
    discrete = {name: torch.cat([d.discrete[name] for d in draws]) for name in draws[0].discrete or {}}
    values.update(discrete)
    chunk_size = osds.config.evaluation.chunk_size
    if osds.model is not None:
        values.update(target.deterministic(flat, discrete or None, chunk_size=chunk_size))
    potential = torch.cat([d.potential for d in draws]).detach().cpu().to(torch.float64)
    weight_stats = {"lp": -potential, "log_q": torch.cat([d.log_q for d in draws]).detach().cpu().to(torch.float64),
                    "log_weight": osds.log_weights.detach().cpu()}
    library_attrs = {"inference_library": "pyro_osds", "inference_library_version": __version__}
    ess_attrs = {"ess_kish": float(evidence.ess), "pareto_k": float(evidence.k_hat)}

    groups = {"posterior": _dataset(_lead(values, index), ("chain", "draw"), coords, dims, dict(library_attrs),
                                    tuple(index.shape))}
    stats = _dataset(_lead(weight_stats if not resample else {"lp": -potential}, index), ("chain", "draw"), None,
                     None, {**library_attrs, **ess_attrs})
    stats["log_marginal_likelihood"] = ("chain", np.array([c.log_z for c in evidence.chains]))
    stats["log_marginal_likelihood_se"] = ("chain", np.array([c.se for c in evidence.chains]))
    stats["ess_kish"] = ("chain", np.array([c.ess for c in evidence.chains]))
    stats["pareto_k"] = ("chain", np.array([c.k_hat for c in evidence.chains]))
    groups["sample_stats"] = stats
    if resample:
        groups["weighted_posterior"] = _dataset(_lead(values, raw), ("chain", "draw"), coords, dims,
                                                dict(library_attrs), tuple(raw.shape))
        groups["weighted_sample_stats"] = _dataset(_lead(weight_stats, raw), ("chain", "draw"), None, None,
                                                   {**library_attrs, **ess_attrs})
    if osds.model is not None:
        if log_likelihood:
            loglik = target.log_likelihood(flat, chunk_size=chunk_size)
            if loglik:
                groups["log_likelihood"] = _dataset(_lead(loglik, index), ("chain", "draw"), coords, dims,
                                                    dict(library_attrs))
        observed = target.observed_data()
        if observed:
            groups["observed_data"] = _dataset({k: _numpy(v) for k, v in observed.items()}, (), coords, dims,
                                               dict(library_attrs))
    if posterior_predictive:
        groups["posterior_predictive"] = _dataset(
            _predictive_arrays(posterior_predictive, *index.shape), ("chain", "draw"), coords, dims,
            dict(library_attrs))
    tree = xr.DataTree.from_dict(groups)
    tree.attrs.update(
        {
            **library_attrs,
            "method": "osds",
            "log_marginal_likelihood": float(evidence.log_z),
            "log_marginal_likelihood_se": float(evidence.se),
            "elbo": float(evidence.elbo),
            "ess": float(evidence.ess),
            "pareto_k": float(evidence.k_hat),
            "num_flow_steps": int(evidence.num_steps),
            "log_det": str(evidence.log_det),
            "num_folded": int(evidence.num_folded),
            "num_lost_modes": int(evidence.num_lost_modes),
            "too_many_modes": int(evidence.too_many_modes),
            "budget": evidence.budget or "none",
            **_cost_attributes(evidence.cost),
            # the verdict of LogEvidence.reliable (netCDF attributes hold no booleans)
            "log_marginal_likelihood_reliable": int(evidence.reliable),
            "resampled": int(bool(resample)),
            "resampling": "systematic, per chain" if resample else "none",
            "settings": json.dumps(osds.config.as_dict()),
        }
    )
    return tree


def _cost_attributes(cost) -> dict:
    """What the run spent (:class:`~pyro_osds.cost.Cost`): the totals, and every phase's as JSON."""
    if cost is None:
        return {}
    total = cost.total
    return {"sampling_time": float(total.seconds), "potential_evaluations": int(total.potential_evaluations),
            "network_passes": int(total.network_passes), "cost": json.dumps(cost.as_dict())}


def to_inference_data(osds, **kwargs):
    """
    :func:`to_datatree` wrapped as ``arviz.InferenceData`` when ArviZ 0.x is installed; the
    DataTree itself otherwise (ArviZ >= 1, or no ArviZ). Same keyword arguments.
    """
    tree = to_datatree(osds, **kwargs)
    try:
        import arviz as az
    except ImportError:
        return tree
    major = int(az.__version__.split(".")[0])
    if major < 1 and hasattr(az.InferenceData, "from_datatree"):
        return az.InferenceData.from_datatree(tree)
    return tree
