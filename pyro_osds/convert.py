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
    constrained draws, dims ``(chain, draw, <site>_dim_<i>)``.
``sample_stats``
    ``lp`` :math:`= -U(z)` (the unnormalised log joint in the unconstrained space, i.e. including the
    log-Jacobian of the constraining transforms), ``log_q`` (the sampler's log density there),
    ``log_weight`` :math:`= \mathrm{lp} - \log q` (the exact importance log-weight), all ``(chain, draw)``,
    and ``log_marginal_likelihood`` per chain (dim ``chain``).
``log_likelihood``
    pointwise log-likelihood of each observed site, ``(chain, draw, *obs_dims)`` (models only).
``observed_data``
    the observed values (models only).

Root attributes: ``log_marginal_likelihood`` and ``log_marginal_likelihood_se`` (pooled over
chains), ``elbo``, ``ess``, ``pareto_k``, ``num_folded``, ``num_lost_modes``, ``too_many_modes``,
``log_marginal_likelihood_reliable`` (1 when :attr:`~pyro_osds.results.LogEvidence.reliable`, 0 when the
evidence must not be trusted), the method, the number of flow steps, the log-det method and the settings.

The draws are **weighted**: ArviZ's ``ess``/``rhat``/``summary`` treat them as unweighted draws of
the sampler (diagnosing the sampler itself); use ``sample_stats.log_weight`` (PSIS, ``extract``
with weights) or ``resample=True`` (equally weighted posterior draws; their effective size is the
Kish ESS in the attributes, not the draw count). Note that ``arviz_stats``' ``psislw`` follows the
LOO convention and expects *log-likelihoods*: pass ``-log_weight`` to it (ArviZ 0.x's
``az.psislw`` takes the log-weights themselves).
"""

from __future__ import annotations

import json

import numpy as np
import torch
import xarray as xr

from ._version import __version__
from .diagnostics import resample_indices

__all__ = ["to_datatree", "to_inference_data"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.numpy() if t.dtype == torch.bool else t.to(torch.float64).numpy() if t.is_floating_point() else t.numpy()


def _dataset(values: dict[str, np.ndarray], lead: tuple[str, ...], coords: dict | None, dims: dict | None,
             attrs: dict) -> xr.Dataset:
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
    if values:
        lead_sizes = next(iter(values.values())).shape[: len(lead)]
        for d, n in zip(lead, lead_sizes, strict=True):
            all_coords[d] = np.arange(n)
    return xr.Dataset(data_vars, coords=all_coords, attrs=attrs)


def to_datatree(osds, *, resample: bool = False, log_likelihood: bool = True, coords: dict | None = None,
                dims: dict | None = None) -> xr.DataTree:
    r"""
    The results of a fitted :class:`~pyro_osds.OSDS` as an :class:`xarray.DataTree` (module
    docstring).

    :param bool resample: equally weighted posterior draws (multinomial resampling on the weights,
        per chain) instead of the raw weighted draws; ``sample_stats`` then describes the resampled
        draws and the root attribute ``resampled`` is set.
    :param bool log_likelihood: compute the pointwise log-likelihood group (models only).
    :param dict coords: extra coordinates, ``{dim_name: values}``.
    :param dict dims: dimension names per variable, ``{var_name: [dim, ...]}``.
    """
    evidence = osds.log_evidence()  # raises unless there are draws
    draws = osds.draws
    num_chains, num_draws = len(draws), draws[0].x.shape[0]
    z = torch.stack([d.x for d in draws])  # (C, N, D)
    potential = torch.stack([d.potential for d in draws]).to(torch.float64)
    log_q = torch.stack([d.log_q for d in draws]).to(torch.float64)
    log_w = torch.stack([d.log_weight for d in draws])
    if resample:
        idx = resample_indices(log_w)
        z = torch.gather(z, 1, idx.unsqueeze(-1).expand_as(z).to(z.device))
        potential, log_q, log_w = (torch.gather(t, 1, idx) for t in (potential.cpu(), log_q.cpu(), log_w.cpu()))
    flat = z.reshape(num_chains * num_draws, -1)
    constrained = osds.target.constrain(flat)
    posterior = {name: _numpy(v.reshape((num_chains, num_draws) + tuple(v.shape[1:])))
                 for name, v in sorted(constrained.items())}
    if draws[0].discrete and not resample:
        for name in draws[0].discrete:
            v = torch.stack([d.discrete[name] for d in draws])
            posterior[name] = _numpy(v.reshape((num_chains, num_draws) + tuple(v.shape[2:])))
    library_attrs = {"inference_library": "pyro_osds", "inference_library_version": __version__}
    groups = {
        "posterior": _dataset(posterior, ("chain", "draw"), coords, dims, dict(library_attrs)),
    }
    stats = _dataset(
        {"lp": _numpy(-potential), "log_q": _numpy(log_q), "log_weight": _numpy(log_w)},
        ("chain", "draw"), None, None, dict(library_attrs),
    )
    stats["log_marginal_likelihood"] = ("chain", np.array([c.log_z for c in evidence.chains]))
    stats["log_marginal_likelihood_se"] = ("chain", np.array([c.se for c in evidence.chains]))
    groups["sample_stats"] = stats
    target = osds.target
    if osds.model is not None:
        if log_likelihood:
            loglik = target.log_likelihood(flat, chunk_size=osds.config.evaluation.chunk_size)
            if loglik:
                groups["log_likelihood"] = _dataset(
                    {k: _numpy(v.reshape((num_chains, num_draws) + tuple(v.shape[1:]))) for k, v in loglik.items()},
                    ("chain", "draw"), coords, dims, dict(library_attrs),
                )
        observed = target.observed_data()
        if observed:
            groups["observed_data"] = _dataset({k: _numpy(v) for k, v in observed.items()}, (), coords, dims,
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
            # the verdict of LogEvidence.reliable (netCDF attributes hold no booleans)
            "log_marginal_likelihood_reliable": int(evidence.reliable),
            "resampled": int(bool(resample)),
            "settings": json.dumps(osds.config.as_dict()),
        }
    )
    return tree


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
