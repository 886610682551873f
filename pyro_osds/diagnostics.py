# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Importance-weighted summaries and diagnostics of draws, as functions (the counterpart of
:mod:`pyro.infer.mcmc.util`'s ``summary`` / ``print_summary`` / ``select_samples``).

Draws are grouped by chain, ``{site: (chains, draws, *shape)}``, with float64 log-weights
``(chains * draws,)`` in the same order. With self-normalised weights
:math:`\bar w_i = w_i / \sum_j w_j` a site's mean is :math:`\sum_i \bar w_i x_i`, its standard deviation
:math:`(\sum_i \bar w_i (x_i - \bar x)^2)^{1/2}`, its quantiles those of the weighted empirical
distribution (:func:`pyro.ops.stats.weighed_quantile`), and ``n_eff`` is the Kish effective sample size
of the weights. ``r_hat`` is split-R-hat between chains (independently trained samplers), which
measures training variability, not correctness.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from itertools import product

import torch
from pyro.ops.stats import split_gelman_rubin, weighed_quantile

from .ops.estimators import kish_ess
from .util import check_positive_int, warn

__all__ = ["between_chain_r_hat", "diagnostics", "print_summary", "resample_indices", "select_indices",
           "subsample_indices", "weighted_summary"]


def between_chain_r_hat(value: torch.Tensor) -> torch.Tensor:
    """Split-R-hat of ``(chains, draws, *shape)`` between chains; NaN with a single chain."""
    if value.shape[0] > 1:
        return split_gelman_rubin(value.to(torch.float64))
    return torch.full(value.shape[2:], math.nan, dtype=torch.float64, device=value.device)


def weighted_summary(samples: dict[str, torch.Tensor], log_weights: torch.Tensor, prob: float = 0.9) -> dict:
    """
    Weighted ``mean``, ``std``, ``median``, the ``prob`` central interval, ``n_eff`` and ``r_hat`` per
    site (module docstring), as :func:`pyro.infer.mcmc.util.summary` lays them out.
    """
    if not 0 < prob < 1:
        raise ValueError(f"`prob` must be in (0, 1), got {prob!r}.")
    log_w = log_weights.reshape(-1)
    w = torch.softmax(log_w, 0)
    ess = float(kish_ess(log_w))
    lo, hi = 0.5 * (1 - prob), 0.5 * (1 + prob)
    out = OrderedDict()
    for name, value in samples.items():
        v = value.reshape((-1,) + tuple(value.shape[2:])).to(torch.float64)
        ww = w.reshape((-1,) + (1,) * (v.dim() - 1)).to(v.device)
        mean = (ww * v).sum(0)
        std = ((ww * (v - mean) ** 2).sum(0)).sqrt()
        q = weighed_quantile(v, [lo, 0.5, hi], log_w.to(v.device), dim=0)
        r_hat = between_chain_r_hat(value)
        out[name] = OrderedDict([("mean", mean), ("std", std), ("median", q[1]), (f"{100 * lo:.1f}%", q[0]),
                                 (f"{100 * hi:.1f}%", q[2]), ("n_eff", torch.full(mean.shape, ess, device=mean.device)),
                                 ("r_hat", r_hat)])
    return out


def print_summary(stats: dict, evidence=None) -> None:
    """Prints :func:`weighted_summary`'s table in Pyro's layout (none without sites), then ``evidence`` (if
    given)."""
    if not stats:
        if evidence is not None:
            print(evidence)
        return
    names = []
    for name, d in stats.items():
        shape = d["mean"].shape
        names += [name] if len(shape) == 0 else [name + "[" + ",".join(map(str, i)) + "]"
                                                 for i in product(*map(range, shape))]
    width = max([len(n) for n in names] + [10])
    head = "{:>" + str(width) + "}" + " {:>9}" * 7
    row = "{:>" + str(width) + "}" + " {:>9.2f}" * 7
    print()
    print(head.format("", *next(iter(stats.values())).keys()))
    for name, d in stats.items():
        shape = d["mean"].shape
        if len(shape) == 0:
            print(row.format(name, *[float(v) for v in d.values()]))
        else:
            for idx in product(*map(range, shape)):
                print(row.format(name + "[" + ",".join(map(str, idx)) + "]", *[float(v[idx]) for v in d.values()]))
    print()
    if evidence is not None:
        print(evidence)
        print()


def diagnostics(samples: dict[str, torch.Tensor], ess: float, evidence, skipped_steps: list[int]) -> dict:
    """
    Per-site ``n_eff`` (``ess``, the Kish ESS of the weights) and ``r_hat`` (between chains) of the
    floating-point sites of ``samples``, then per-chain ``log_evidence``, ``ess``, ``k_hat``, ``folded``
    draws (from ``evidence``, a :class:`~pyro_osds.results.LogEvidence`) and ``skipped_steps``.
    """
    out: dict = OrderedDict()
    for name, value in samples.items():
        if not value.is_floating_point():
            continue
        out[name] = OrderedDict([("n_eff", torch.full(value.shape[2:], ess, device=value.device)), ("r_hat", between_chain_r_hat(value))])
    chains = evidence.chains
    out["log_evidence"] = {f"chain {i}": c.log_z for i, c in enumerate(chains)}
    out["ess"] = {f"chain {i}": c.ess for i, c in enumerate(chains)}
    out["k_hat"] = {f"chain {i}": c.k_hat for i, c in enumerate(chains)}
    out["folded"] = {f"chain {i}": c.num_folded for i, c in enumerate(chains)}
    out["skipped_steps"] = {f"chain {i}": n for i, n in enumerate(skipped_steps)}
    return out


def resample_indices(log_weights: torch.Tensor, num_draws: int | None = None, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    r"""
    Systematic resampling indices along the last dim of ``log_weights``, ``(..., num_draws)`` (default: as
    many as there are draws), in proportion to the weights: one uniform :math:`u` per row and the indices
    :math:`i_m = F^{-1}((u + m) / M)` of the weights' cumulative sum :math:`F`, so that draw :math:`i` is
    kept :math:`\lfloor M\bar w_i\rfloor` or :math:`\lceil M\bar w_i\rceil` times (the least variance of
    the unbiased schemes; multinomial resampling adds a binomial count per draw). The indices are in
    increasing order, so the copies of a draw are adjacent and an autocorrelation ESS (ArviZ's ``ess``) of
    the resampled draws estimates the weights' effective size rather than the draw count.

    The resampled draws are equally weighted draws of the posterior whose effective size is the weights' ESS,
    not their count.

    :param torch.Tensor log_weights: ``(..., N)`` log-weights (any normalisation).
    :param int num_draws: how many indices per row.
    :param torch.Generator generator: the uniforms' random stream (default: the global one).

    **Reference**: Douc, Cappé and Moulines, `Comparison of resampling schemes for particle filtering`,
    ISPA 2005.
    """
    n = log_weights.shape[-1] if num_draws is None else num_draws
    check_positive_int("num_draws", n)
    w = torch.softmax(log_weights.detach().to(torch.float64).cpu(), -1)
    cdf = torch.cumsum(w, -1)
    cdf = cdf / cdf[..., -1:]
    u = torch.rand(w.shape[:-1] + (1,), dtype=torch.float64, generator=generator, device="cpu")
    positions = (u + torch.arange(n, dtype=torch.float64, device="cpu")) / n
    idx = torch.searchsorted(cdf, positions.expand(w.shape[:-1] + (n,)).contiguous(), right=True)
    return idx.clamp_max(w.shape[-1] - 1)


def subsample_indices(num_draws: int, num_samples: int) -> torch.Tensor:
    """``min(num_samples, num_draws)`` distinct indices in random order (without replacement, unlike
    :func:`pyro.infer.mcmc.util.select_samples`, so no draw is repeated; global RNG)."""
    check_positive_int("num_samples", num_samples)
    return torch.randperm(num_draws, device="cpu")[: min(num_samples, num_draws)]


def select_indices(log_weights: torch.Tensor, *, num_samples: int | None = None, group_by_chain: bool = False,
                   resample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Indices into the pooled draws (``chains * draws``, chain-major) of draws with log-weights
    ``(chains, draws)``, shaped ``(chains, M)`` with ``group_by_chain``, else ``(1, M)``: the draws resampled by
    their weights (:func:`resample_indices` with ``generator``; per chain with ``group_by_chain``, else over the
    pooled draws; a warning says when the weights' ESS is below a tenth of the draws), then ``num_samples``
    distinct positions picked at random (global RNG; per chain with ``group_by_chain``).
    """
    C, N = log_weights.shape
    idx = torch.arange(C * N, device="cpu").reshape(C, N)
    if not group_by_chain:
        idx = idx.reshape(1, C * N)
    if resample:
        lw = log_weights if group_by_chain else log_weights.reshape(1, C * N)
        idx = torch.gather(idx, 1, resample_indices(lw, generator=generator))
        ess = float(kish_ess(log_weights.reshape(-1)))
        if ess < 0.1 * C * N:
            warn(f"Resampled draws carry only about {ess:.0f} effective samples (Kish ESS of the weights) out of "
                 f"{C * N}.", RuntimeWarning)
    if num_samples is not None:
        picks = torch.stack([subsample_indices(idx.shape[1], num_samples) for _ in range(idx.shape[0])])
        idx = torch.gather(idx, 1, picks)
    return idx
