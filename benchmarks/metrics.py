# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Metrics of the benchmark harness: pure functions of draws, log-weights and reference values.

Conventions: draws are ``(N, D)`` tensors in the target's flat unconstrained coordinates
(:mod:`benchmarks.targets`); log-weights are :math:`\log w_i = -U(x_i) - \log q(x_i)`; every function
returns plain Python floats (or dicts / lists of them), so results serialise to JSON as they are.

* evidence: :func:`abs_delta_log_z`, :func:`elbo_exceeds_reference` (an "ELBO" above
  :math:`\log Z_{\rm ref}` + 3 SE is not a valid lower bound), :func:`kish_ess_fraction`,
  :func:`k_hat`, :func:`mean_sd`;
* posterior moments: :func:`weighted_moments` (self-normalised importance weights),
  :func:`moment_errors` (errors in units of the reference posterior sd);
* sample quality against reference draws: :func:`sinkhorn_divergence` (debiased entropic OT, POT when
  installed, else a log-domain implementation in torch, :func:`sinkhorn_divergence_torch`) and
  :func:`mmd` (Gaussian kernel with the median heuristic, square root reported);
* MCMC efficiency: :func:`mcmc_ess` (ArviZ bulk / tail ESS per coordinate) and :func:`ess_per_second`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pyro_osds.ops.estimators import kish_ess, pareto_k_hat

__all__ = [
    "SINKHORN_RELATIVE_EPSILON",
    "abs_delta_log_z",
    "elbo_exceeds_reference",
    "ess_per_second",
    "k_hat",
    "kish_ess_fraction",
    "mcmc_ess",
    "mean_sd",
    "mmd",
    "moment_errors",
    "sinkhorn_divergence",
    "sinkhorn_divergence_torch",
    "sinkhorn_epsilon",
    "weighted_moments",
]

#: Entropic regularisation of the Sinkhorn divergence, relative to the mean squared distance between
#: the reference draws (see :func:`sinkhorn_epsilon`).
SINKHORN_RELATIVE_EPSILON = 0.05


def _finite_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# Evidence


def abs_delta_log_z(log_z: float, reference_log_z: float | None) -> float:
    r"""
    :math:`|\log\hat Z - \log Z_{\rm ref}|`.

    :param float log_z: the estimate.
    :param reference_log_z: the exact or reference value; ``None`` when there is none.
    :return: the absolute error, NaN without a reference or a finite estimate.
    """
    if reference_log_z is None or log_z is None or not math.isfinite(log_z):
        return math.nan
    return abs(float(log_z) - float(reference_log_z))


def elbo_exceeds_reference(elbo: float, elbo_se: float, reference_log_z: float | None, reference_se: float = 0.0,
                           num_se: float = 3.0) -> bool | None:
    r"""
    Whether an "ELBO" is an invalid lower bound: :math:`\mathrm{ELBO} > \log Z_{\rm ref} + 3\,\mathrm{SE}`
    with the combined standard error :math:`\mathrm{SE} = \sqrt{\mathrm{SE}_{\rm ELBO}^2 + \mathrm{SE}_{\rm ref}^2}`.

    A true ELBO (mean log-weight of exact weights) is below :math:`\log Z`, so exceeding it by more
    than the Monte-Carlo error means the weights do not describe the draws (e.g. an Euler-Hutchinson
    volume instead of the exact log-determinant).

    :param float elbo: ELBO estimate.
    :param float elbo_se: its Monte-Carlo standard error (NaN counts as 0).
    :param reference_log_z: reference log Z, or ``None``.
    :param float reference_se: standard error of the reference (0 when exact).
    :param float num_se: the tolerance in standard errors.
    :return: ``True`` / ``False``, or ``None`` when there is no reference or no finite ELBO.
    """
    if reference_log_z is None or elbo is None or not math.isfinite(elbo):
        return None
    se = math.sqrt((elbo_se if elbo_se is not None and math.isfinite(elbo_se) else 0.0) ** 2 + reference_se**2)
    return bool(elbo > reference_log_z + num_se * se)


def kish_ess_fraction(log_w: torch.Tensor) -> float:
    r"""
    Kish effective sample size per draw, :math:`(\sum w)^2 / (N \sum w^2) \in (0, 1]`, from
    log-weights (non-finite entries count as zero weight; NaN if none is finite).
    """
    log_w = torch.as_tensor(log_w, dtype=torch.float64).reshape(-1)
    n = log_w.numel()
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    if n == 0 or not bool(torch.isfinite(log_w).any()):
        return math.nan
    return float(kish_ess(log_w)) / n


def k_hat(log_w: torch.Tensor) -> float:
    r"""PSIS Pareto :math:`\hat k` of the importance weights (:func:`pyro_osds.estimators.pareto_k_hat`)."""
    return float(pareto_k_hat(log_w))


def mean_sd(values: Sequence[float]) -> dict:
    r"""
    Mean and sample standard deviation (``ddof=1``) over repeats, ignoring non-finite entries.

    :return: ``{"mean", "sd", "n", "values"}`` (``sd`` NaN for fewer than two finite values).
    """
    vals = [float(v) for v in values if v is not None]
    finite = [v for v in vals if math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "sd": sd, "n": n, "values": vals}


# ---------------------------------------------------------------------------------------------------
# Posterior moments


def weighted_moments(x: torch.Tensor, log_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Posterior mean and standard deviation per coordinate from draws, self-normalised by importance
    weights when given: :math:`\bar w_i = w_i / \sum_j w_j`, :math:`\hat\mu = \sum_i \bar w_i x_i`,
    :math:`\hat\sigma^2 = \sum_i \bar w_i (x_i - \hat\mu)^2`. Draws with non-finite weight or
    coordinates are dropped.

    :param torch.Tensor x: ``(N, D)`` draws.
    :param log_w: ``(N,)`` log-weights, or ``None`` for equally weighted draws (MCMC).
    :return: ``(mean, sd)``, each ``(D,)`` float64.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if log_w is None:
        log_w = torch.zeros(x.shape[0], dtype=torch.float64)
    log_w = torch.as_tensor(log_w, dtype=torch.float64).reshape(-1)
    ok = torch.isfinite(log_w) & torch.isfinite(x).all(-1)
    x, log_w = x[ok], log_w[ok]
    if x.shape[0] == 0:
        nan = torch.full((x.shape[-1],), math.nan, dtype=torch.float64)
        return nan, nan
    w = torch.softmax(log_w, 0)
    mean = (w[:, None] * x).sum(0)
    var = (w[:, None] * (x - mean) ** 2).sum(0)
    return mean, var.sqrt()


def moment_errors(mean: torch.Tensor, sd: torch.Tensor, reference_mean, reference_sd) -> dict:
    r"""
    Errors of posterior moments in units of the reference posterior sd, per coordinate
    :math:`|\hat\mu_j - \mu_j| / \sigma_j` and :math:`|\hat\sigma_j - \sigma_j| / \sigma_j`, summarised
    by their maximum and median (midpoint of the two middle values for an even count) over coordinates.

    :return: ``{"mean_error_max", "mean_error_median", "sd_error_max", "sd_error_median"}``.
    """
    mean = torch.as_tensor(mean, dtype=torch.float64)
    sd = torch.as_tensor(sd, dtype=torch.float64)
    ref_mean = torch.as_tensor(reference_mean, dtype=torch.float64)
    ref_sd = torch.as_tensor(reference_sd, dtype=torch.float64)
    if mean.shape != ref_mean.shape or sd.shape != ref_sd.shape:
        raise ValueError(f"moment shapes differ: {tuple(mean.shape)} vs reference {tuple(ref_mean.shape)}")
    err_mean = (mean - ref_mean).abs() / ref_sd
    err_sd = (sd - ref_sd).abs() / ref_sd
    return {
        "mean_error_max": float(err_mean.max()),
        "mean_error_median": float(torch.quantile(err_mean, 0.5)),
        "sd_error_max": float(err_sd.max()),
        "sd_error_median": float(torch.quantile(err_sd, 0.5)),
    }


# ---------------------------------------------------------------------------------------------------
# Distances between point clouds


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``(N, M)`` (clamped at 0)."""
    d = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2.0 * x @ y.T
    return d.clamp_min(0.0)


def sinkhorn_epsilon(reference: torch.Tensor, relative: float = SINKHORN_RELATIVE_EPSILON) -> float:
    r"""
    Entropic regularisation used for :func:`sinkhorn_divergence`:
    :math:`\varepsilon = 0.05 \cdot \operatorname{mean}_{i \ne j}\|y_i - y_j\|^2` over the reference
    draws :math:`y` (about :math:`0.1\,\operatorname{tr}\Sigma_{\rm ref}`).

    This is ott-jax's default relative scale (5 % of the mean cost), anchored on the reference so that
    every method of a target is measured with the same :math:`\varepsilon`. The OSDS code passes an
    absolute :math:`\varepsilon = 10^{-3}`, which at the scale of these targets (e.g. the funnel's
    :math:`\operatorname{tr}\Sigma \approx 800`) is essentially unregularised optimal transport and
    does not converge in reasonable time on a CPU; our values are therefore not on the paper's scale.
    """
    y = torch.as_tensor(reference, dtype=torch.float64)
    n = y.shape[0]
    if n < 2:
        raise ValueError("need at least two reference draws")
    return float(relative * _sq_dist(y, y).sum() / (n * (n - 1)))


def _entropic_ot_cost(cost: torch.Tensor, epsilon: float, num_iterations: int, threshold: float) -> tuple[float, bool]:
    r"""
    Transport cost :math:`\langle P, C\rangle` of the entropic OT plan between uniform weights, by
    log-domain Sinkhorn iterations on the dual potentials, stopped when the L2 norm of the column
    marginal violation falls below ``threshold`` (checked every 10 iterations, as POT does).
    Returns ``(cost, converged)``.
    """
    n, m = cost.shape
    log_a = torch.full((n,), -math.log(n), dtype=cost.dtype)
    log_b = torch.full((m,), -math.log(m), dtype=cost.dtype)
    k = -cost / epsilon
    u = torch.zeros(n, dtype=cost.dtype)  # log scalings: log P = k + u_i + v_j
    v = torch.zeros(m, dtype=cost.dtype)
    converged = False
    for it in range(num_iterations):
        v = log_b - torch.logsumexp(k + u[:, None], 0)
        u = log_a - torch.logsumexp(k + v[None, :], 1)
        if it % 10 == 0:
            err = float(torch.linalg.vector_norm(torch.exp(k + u[:, None] + v[None, :]).sum(0) - torch.exp(log_b)))
            if err < threshold:
                converged = True
                break
    return float((torch.exp(k + u[:, None] + v[None, :]) * cost).sum()), converged


def _sinkhorn_threshold(tolerance: float, m: int) -> float:
    """POT-style stopping threshold (L2 norm of the marginal violation) for an L1-like ``tolerance``."""
    return tolerance / math.sqrt(m)


def sinkhorn_divergence_torch(x: torch.Tensor, y: torch.Tensor, epsilon: float, *, num_iterations: int = 3000,
                              tolerance: float = 1e-3) -> tuple[float, bool]:
    r"""
    Debiased Sinkhorn divergence with squared Euclidean cost, in torch (log domain):
    :math:`S_\varepsilon(x, y) = \mathrm{OT}_\varepsilon(x, y) - \tfrac12\mathrm{OT}_\varepsilon(x, x)
    - \tfrac12\mathrm{OT}_\varepsilon(y, y)`, where :math:`\mathrm{OT}_\varepsilon` is the transport
    cost :math:`\langle P_\varepsilon, C\rangle` of the entropic plan (what POT's
    ``empirical_sinkhorn_divergence`` returns), clipped at 0.

    :param float tolerance: stop when the L2 norm of the marginal violation is below
        ``tolerance / sqrt(m)`` (about ``tolerance`` of the mass misplaced, in L1).
    :return: ``(value, converged)``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    results = [
        _entropic_ot_cost(_sq_dist(a, b), epsilon, num_iterations, _sinkhorn_threshold(tolerance, b.shape[0]))
        for a, b in ((x, y), (x, x), (y, y))
    ]
    (xy, _), (xx, _), (yy, _) = results
    return max(xy - 0.5 * (xx + yy), 0.0), all(ok for _, ok in results)


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, epsilon: float | None = None, *,
                        num_iterations: int = 3000, tolerance: float = 1e-3) -> dict:
    r"""
    Debiased Sinkhorn divergence (squared Euclidean cost, uniform weights) between draws ``x`` and
    reference draws ``y``; see :func:`sinkhorn_divergence_torch` for the definition and the stopping
    rule and :func:`sinkhorn_epsilon` for the default :math:`\varepsilon`. Uses POT's
    ``ot.bregman.empirical_sinkhorn_divergence`` with its log-domain solver when POT is installed,
    else the torch implementation (same iterations and stopping rule). Rows with non-finite
    coordinates are dropped.

    :return: ``{"value", "epsilon", "converged", "backend", "n", "m"}``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    x = x[torch.isfinite(x).all(-1)]
    y = y[torch.isfinite(y).all(-1)]
    eps = sinkhorn_epsilon(y) if epsilon is None else float(epsilon)
    try:
        import ot
    except ImportError:
        ot = None
    if ot is None:
        value, converged = sinkhorn_divergence_torch(x, y, eps, num_iterations=num_iterations, tolerance=tolerance)
        backend = "torch"
    else:
        threshold = _sinkhorn_threshold(tolerance, y.shape[0])
        # with ``log=True`` POT also returns exp(log-scalings), which may overflow harmlessly (the
        # divergence itself is computed from the log-domain plan)
        with np.errstate(over="ignore", under="ignore"):
            div, log = ot.bregman.empirical_sinkhorn_divergence(
                x.numpy(), y.numpy(), eps, metric="sqeuclidean", numIterMax=num_iterations, stopThr=threshold,
                method="sinkhorn_log", log=True, warn=False,
            )
        value = float(div)
        converged = all(
            len(log[key]["err"]) > 0 and float(log[key]["err"][-1]) < threshold
            for key in ("log_sinkhorn_ab", "log_sinkhorn_a", "log_sinkhorn_b")
        )
        backend = f"pot {ot.__version__}"
    return {"value": value, "epsilon": eps, "converged": bool(converged), "backend": backend, "n": int(x.shape[0]),
            "m": int(y.shape[0])}


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> dict:
    r"""
    Maximum mean discrepancy with a Gaussian kernel :math:`k(a, b) = \exp(-\|a - b\|^2 / (2h^2))`,
    the biased (V-statistic, non-negative) estimate, square root reported:
    :math:`\mathrm{MMD} = \big(\overline{k(x, x')} + \overline{k(y, y')} - 2\,\overline{k(x, y)}\big)^{1/2}`.

    :param bandwidth: :math:`h`; default the median heuristic, the median pairwise distance of the
        pooled draws.
    :return: ``{"value", "bandwidth", "n", "m"}``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    x = x[torch.isfinite(x).all(-1)]
    y = y[torch.isfinite(y).all(-1)]
    if bandwidth is None:
        z = torch.cat([x, y])
        d2 = _sq_dist(z, z)
        iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
        bandwidth = math.sqrt(float(np.median(d2[iu[0], iu[1]].numpy())))
    h2 = 2.0 * bandwidth**2
    kxx = torch.exp(-_sq_dist(x, x) / h2).mean()
    kyy = torch.exp(-_sq_dist(y, y) / h2).mean()
    kxy = torch.exp(-_sq_dist(x, y) / h2).mean()
    value = float((kxx + kyy - 2.0 * kxy).clamp_min(0.0).sqrt())
    return {"value": value, "bandwidth": float(bandwidth), "n": int(x.shape[0]), "m": int(y.shape[0])}


# ---------------------------------------------------------------------------------------------------
# MCMC efficiency


def mcmc_ess(draws: torch.Tensor) -> dict:
    r"""
    Bulk and tail effective sample sizes per coordinate of one MCMC chain, by ArviZ
    (``arviz.ess``, rank-normalised split-:math:`\hat R` methodology).

    :param torch.Tensor draws: ``(num_draws, D)`` (one chain) or ``(num_chains, num_draws, D)``.
    :return: ``{"bulk", "tail"}`` lists plus ``bulk_min``, ``bulk_median``, ``tail_min``, ``tail_median``.
    """
    import arviz as az

    a = torch.as_tensor(draws, dtype=torch.float64).numpy()
    if a.ndim == 2:
        a = a[None]
    data = az.convert_to_dataset({"x": a})
    out = {}
    for method in ("bulk", "tail"):
        values = np.asarray(az.ess(data, method=method)["x"].values, dtype=float).reshape(-1)
        out[method] = values.tolist()
        out[f"{method}_min"] = float(np.min(values))
        out[f"{method}_median"] = float(np.median(values))
    return out


def ess_per_second(ess: float, seconds: float) -> float:
    """Effective samples per second (NaN for a non-positive or missing time)."""
    ess, seconds = _finite_or_nan(ess), _finite_or_nan(seconds)
    if not (seconds > 0) or not math.isfinite(ess):
        return math.nan
    return ess / seconds
