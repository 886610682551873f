# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Model comparison by log evidence (Bayes factors).

For fitted models :math:`M_1, \dots, M_m` with estimates :math:`\log\hat Z_j \pm s_j`:

.. math::

    \log \mathrm{BF}_{j,\rm best} = \log\hat Z_j - \log\hat Z_{\rm best}, \qquad
    \operatorname{SE} = \sqrt{s_j^2 + s_{\rm best}^2}, \qquad
    P(M_j \mid y) = \frac{\hat Z_j P(M_j)}{\sum_k \hat Z_k P(M_k)}\ \text{(default: equal prior odds)}.

The estimates of different models are independent, hence the sum of variances.
"""

from __future__ import annotations

import math
import warnings

import pandas as pd

from .ops.estimators import K_HAT_THRESHOLD, NEAR_CONSTANT_ESS, Estimates
from .results import LogEvidence

__all__ = ["compare"]


def _evidence_of(name, fitted):
    evidence = fitted.log_evidence() if callable(getattr(fitted, "log_evidence", None)) else fitted
    if isinstance(evidence, (LogEvidence, Estimates)):
        return evidence
    raise TypeError(f"compare: {name!r} must be a fitted OSDS (or its log_evidence()), got {type(fitted).__name__}.")


def compare(models: dict, *, prior_probs: dict | None = None, k_hat_threshold: float = K_HAT_THRESHOLD,
            min_ess: float = 100.0) -> pd.DataFrame:
    r"""
    Compares models by their log evidence.

    :param dict models: ``{name: fitted OSDS or its log_evidence()}`` (at least one).
    :param dict prior_probs: prior model probabilities ``{name: P(M)}`` (default: equal), normalised here; the
        ``weight`` column is then :math:`P(M_j \mid y) \propto \hat Z_j P(M_j)`.
    :param float k_hat_threshold: Pareto :math:`\hat k` above which an estimate is flagged unreliable (0.5: above it
        the weights' variance is infinite and the SE understates the error), unless
        its weights are nearly constant (ESS/N >= 0.99; see :attr:`~pyro_osds.ops.estimators.Estimates.reliable`).
    :param float min_ess: Kish ESS below which an estimate is flagged unreliable (an exact one, SE 0, needs none).
    :raises ValueError: when an estimate's weights are not exact (an approximate log-det such as Hutchinson's).
    :returns: a :class:`pandas.DataFrame` laid out as :func:`arviz.compare`'s, indexed by model name, sorted
        best first (highest log evidence), with columns ``rank`` (0 = best), ``log_z``, ``se``, ``log_bf``
        (against the best model; ArviZ's ``elpd_diff``), ``log_bf_se`` (ArviZ's ``dse``), ``weight`` (the
        posterior model probability), ``elbo``, ``ess``, ``k_hat``, ``folded``, ``lost_modes``,
        ``too_many_modes``, ``reliable`` and ``warning`` (``not reliable``, as ArviZ flags its estimates).

    A ``UserWarning`` names every model whose estimate is unreliable (:math:`\hat k` above the
    threshold, ESS below ``min_ess``, a non-finite standard error, draws where the flow folds, whose
    weights are not exact, or a mode the mode search found that the draws carry almost no weight near,
    whose mass the estimate misses, or more separated modes than the mode search could enumerate).

    **Example**::

        >>> table = compare({"linear": osds_linear, "quadratic": osds_quad})  # doctest: +SKIP
        >>> table.loc["linear", "log_bf"]  # doctest: +SKIP
    """
    if not isinstance(models, dict) or not models:
        raise ValueError("compare needs a non-empty dict {name: fitted OSDS}.")
    rows = []
    for name, fitted in models.items():
        ev = _evidence_of(name, fitted)
        if not ev.exact:
            raise ValueError(
                f"compare: the evidence of {name!r} comes from the approximate {ev.log_det!r} log-det, which gives no "
                "bound and no consistent log Z, so its Bayes factors would mean nothing. Draw it again with the exact "
                "volume: `osds.sample(log_det='exact')` (and leave `exact_log_det_max_dim` unset).")
        rows.append({"model": str(name), "log_z": ev.log_z, "se": ev.se, "elbo": ev.elbo, "ess": ev.ess,
                     "ess_per_draw": ev.ess_per_draw, "k_hat": ev.k_hat, "folded": int(ev.num_folded),
                     "lost_modes": int(getattr(ev, "num_lost_modes", 0)),
                     "too_many_modes": bool(getattr(ev, "too_many_modes", False))})
    table = pd.DataFrame(rows).set_index("model")
    best = table["log_z"].idxmax()
    table["log_bf"] = table["log_z"] - table.loc[best, "log_z"]
    table["log_bf_se"] = [0.0 if name == best else math.sqrt(se**2 + table.loc[best, "se"] ** 2)
                          for name, se in table["se"].items()]
    log_prior = pd.Series(0.0, index=table.index)
    if prior_probs is not None:
        if set(prior_probs) != set(table.index) or any(not (p > 0 and math.isfinite(p)) for p in prior_probs.values()):
            raise ValueError(f"`prior_probs` must give a positive probability to each model {sorted(table.index)}, "
                             f"got {prior_probs!r}.")
        log_prior = pd.Series({str(k): math.log(v) for k, v in prior_probs.items()})
    log_post = table["log_z"] + log_prior
    weights = (log_post - log_post.max()).map(math.exp)
    table["weight"] = weights / weights.sum()
    k_hat = table["k_hat"].fillna(-math.inf)
    tail_ok = (k_hat <= k_hat_threshold) | (table["ess_per_draw"] >= NEAR_CONSTANT_ESS)
    exact = table["se"] == 0  # equal weights: a model with nothing to sample, its log Z exact whatever the draws
    table["reliable"] = (tail_ok & ((table["ess"] >= min_ess) | exact) & table["se"].map(math.isfinite)
                         & (table["folded"] == 0) & (table["lost_modes"] == 0) & ~table["too_many_modes"])
    table["warning"] = ~table["reliable"]
    table = table.sort_values("log_z", ascending=False)
    table.insert(0, "rank", range(len(table)))
    table = table[["rank", "log_z", "se", "log_bf", "log_bf_se", "weight", "elbo", "ess", "k_hat", "folded",
                   "lost_modes", "too_many_modes", "reliable", "warning"]]
    bad = [name for name, ok in table["reliable"].items() if not ok]
    if bad:
        details = "; ".join(
            f"{n}: k_hat={table.loc[n, 'k_hat']:.2f}, ESS={table.loc[n, 'ess']:.0f}"
            + (f", {table.loc[n, 'folded']} folded draws" if table.loc[n, "folded"] else "")
            + (f", {table.loc[n, 'lost_modes']} lost mode(s)" if table.loc[n, "lost_modes"] else "")
            + (", more modes than the mode search could enumerate" if table.loc[n, "too_many_modes"] else "")
            for n in bad
        )
        warnings.warn(
            f"Unreliable log-evidence estimate(s) ({details}): Bayes factors involving them may be wrong. Train "
            "longer, use more flow steps (`sample(num_steps=...)`) or more draws.",
            UserWarning,
            stacklevel=2,
        )
    return table
