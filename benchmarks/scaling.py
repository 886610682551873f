# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
How the cost of exact evidence grows with the dimension (issue #14), against NUTS in the same run.

.. code-block:: bash

    OMP_NUM_THREADS=1 python -m benchmarks.scaling --out benchmarks/results/scaling

Targets, all Pyro models as a user writes them:

* ``logreg<D>``: Bayesian logistic regression, :math:`w \sim N(0, I_D)`, :math:`n = 3D` rows
  :math:`x_i \sim N(0, I_D/D)` (logits of unit scale at every D), labels drawn from a true
  :math:`w^\star \sim N(0, I_D)`. The reference :math:`\log Z` is adaptive tempered SMC
  (:func:`benchmarks.gold_standard.tempered_smc`) in the coordinates whitened by the Laplace fit,
  several independent runs, SE from their spread.
* ``hier<J>``: a Gaussian random-effects model with :math:`J` groups written centred,
  :math:`\mu \sim N(0, 5^2)`, :math:`\tau \sim \mathrm{HalfNormal}(2)`, :math:`\theta_j \sim N(\mu, \tau^2)`,
  :math:`y_j \sim N(\theta_j, \sigma_j^2)` with known :math:`\sigma_j`: :math:`J + 2` latents. Its
  :math:`\log Z` is exact: :math:`\theta` and :math:`\mu` integrate out in closed form and :math:`\tau` by
  quadrature.

For each target, one chain of each sampler with its defaults:

* **OSDS**: ``OSDS(model, num_chains=1)``; ``fit`` (preconditioner, mode search, training, early stopping)
  is timed, then ``sample`` of ``--draws`` draws with exact weights (twice: the first also makes the chains'
  diagnostic draws). *Time to 1000 ESS* is the fit time plus the diagnostic draws' pass plus the draw-and-weight
  time per draw times the draws that give a Kish ESS of 1000.
* **NUTS**: Pyro's ``NUTS`` (``jit_compile=False``), ``--nuts-warmup`` + ``--nuts-samples``; *time to 1000
  ESS* is the wall clock (warm-up included) times 1000 over the smallest bulk ESS over coordinates.

The ratio OSDS / NUTS of the times to 1000 ESS is measured in the same run (these machines are noisy).
Writes ``<out>/scaling.json``, ``<out>/scaling.md`` and ``<out>/scaling.png`` (log-log time against D).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from pyro_osds import OSDS
from pyro_osds.ops.jacobian import potential_score_hessian

from . import metrics
from .gold_standard import tempered_smc
from .run import environment_info

D64 = torch.float64
DEFAULT_TARGETS = ("logreg32", "logreg64", "logreg128", "logreg256", "logreg512", "logreg1024", "hier1000")


@dataclass
class ScalingTarget:
    """A Pyro model with its data, its latent dimension and a reference :math:`\\log Z` (with its SE)."""

    name: str
    dim: int
    num_rows: int
    model: Callable
    model_args: tuple
    reference: Callable[[int], tuple[float, float, str]]  # seed -> (log Z, SE, method)


# ---------------------------------------------------------------------------------------------------
# Logistic regressions


def _logistic_data(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + dim + seed)
    rows = 3 * dim
    x = torch.randn(rows, dim, dtype=D64, generator=gen) / math.sqrt(dim)
    w_true = torch.randn(dim, dtype=D64, generator=gen)
    y = (torch.rand(rows, dtype=D64, generator=gen) < torch.sigmoid(x @ w_true)).to(D64)
    return x, y


def logistic_model(x: torch.Tensor, y: torch.Tensor | None = None):
    """Bayesian logistic regression with a standard normal prior on the weights."""
    w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))  # on the data's device
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def laplace_smc_reference(potential: Callable[[torch.Tensor], torch.Tensor], dim: int, *, seed: int,
                          num_runs: int = 4, num_particles: int | None = None, start: torch.Tensor | None = None
                          ) -> tuple[float, float, str]:
    r"""
    :math:`\log Z = \log\int e^{-U}` of a smooth unimodal potential by adaptive tempered SMC
    (:func:`benchmarks.gold_standard.tempered_smc`) in the coordinates whitened by its Laplace fit (damped
    Newton's method with exact Hessians from ``start``, default zero), ``num_runs`` independent runs; returns
    (mean, SE of the mean, method).
    """
    mode = torch.zeros(dim, dtype=D64) if start is None else start.to(D64).clone()
    u, score, hess = potential_score_hessian(potential, mode[None])
    for _ in range(200):
        step = torch.linalg.solve(hess[0], score[0])  # Newton: x - H^{-1} grad U = x + H^{-1} score
        size = 1.0
        while size > 1e-8:
            trial = mode + size * step
            u_trial, score_trial, hess_trial = potential_score_hessian(potential, trial[None])
            if float(u_trial) <= float(u):
                break
            size /= 2
        else:  # no step lowers the potential: the mode to rounding
            break
        mode, u, score, hess = trial, u_trial, score_trial, hess_trial
        if float((size * step).abs().max()) < 1e-10:
            break
    scale = torch.linalg.inv(torch.linalg.cholesky(hess[0])).T  # L with L L^T = H^{-1}
    log_det = float(torch.linalg.slogdet(scale)[1])

    def whitened(z):
        return -potential(mode + z @ scale.T) + log_det

    particles = num_particles or (1024 if dim <= 256 else 512)
    gen = torch.Generator().manual_seed(seed)
    runs = [tempered_smc(whitened, dim, num_particles=particles, generator=gen).log_z for _ in range(num_runs)]
    mean = sum(runs) / num_runs
    sd = math.sqrt(sum((r - mean) ** 2 for r in runs) / (num_runs - 1))
    return mean, sd / math.sqrt(num_runs), f"tempered SMC from the Laplace fit, {num_runs} runs x {particles} particles"


def logistic_potential(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The potential of :func:`logistic_model` on ``(batch, D)`` weights, normalising constants included."""
    dim = x.shape[1]

    def potential(w):
        logits = w @ x.T
        return (0.5 * (w**2).sum(-1) + 0.5 * dim * math.log(2 * math.pi)
                - (y * logits - torch.nn.functional.softplus(logits)).sum(-1))

    return potential


# ---------------------------------------------------------------------------------------------------
# Gaussian random effects


PRIOR_LOC_SD, PRIOR_TAU_SCALE = 5.0, 2.0


def _hierarchical_data(groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + groups + seed)
    sigma = 0.5 + 1.5 * torch.rand(groups, dtype=D64, generator=gen)
    theta = 1.0 + 1.0 * torch.randn(groups, dtype=D64, generator=gen)
    y = theta + sigma * torch.randn(groups, dtype=D64, generator=gen)
    return y, sigma


def hierarchical_model(sigma: torch.Tensor, y: torch.Tensor | None = None):
    """Centred Gaussian random effects with known observation noise ``sigma``."""
    mu = pyro.sample("mu", dist.Normal(sigma.new_tensor(0.0), PRIOR_LOC_SD))  # on the data's device
    tau = pyro.sample("tau", dist.HalfNormal(sigma.new_tensor(PRIOR_TAU_SCALE)))
    with pyro.plate("groups", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def hierarchical_log_z(y: torch.Tensor, sigma: torch.Tensor, num_points: int = 40001, *,
                       loc_sd: float = PRIOR_LOC_SD, tau_prior: dist.Distribution | None = None) -> float:
    r"""
    Exact :math:`\log Z` of :func:`hierarchical_model`: given :math:`\tau`, :math:`y_j \sim N(\mu, \tau^2 +
    \sigma_j^2)` and :math:`\mu` integrates out in closed form; the trapezoid rule over :math:`\log\tau` on a grid
    that covers the posterior of :math:`\tau` (converged to far below any Monte Carlo error). ``loc_sd`` and
    ``tau_prior`` are the priors' (default: :func:`hierarchical_model`'s).
    """
    log_tau = torch.linspace(-40.0, 5.0, num_points, dtype=D64)  # below e^-40 the prior mass is negligible
    tau = log_tau.exp()
    var = tau[:, None] ** 2 + sigma**2
    precision = 1 / loc_sd**2 + (1 / var).sum(-1)
    shift = (y / var).sum(-1)
    log_lik = (-0.5 * math.log(loc_sd**2) - 0.5 * torch.log(2 * math.pi * var).sum(-1)
               - 0.5 * (y**2 / var).sum(-1) - 0.5 * torch.log(precision) + 0.5 * shift**2 / precision)
    tau_prior = dist.HalfNormal(torch.tensor(PRIOR_TAU_SCALE, dtype=D64)) if tau_prior is None else tau_prior
    log_prior = tau_prior.log_prob(tau) + log_tau  # d tau = tau d log tau
    integrand = log_lik + log_prior
    step = float(log_tau[1] - log_tau[0])
    log_weights = torch.full_like(log_tau, math.log(step))
    log_weights[[0, -1]] = math.log(step / 2)
    return float(torch.logsumexp(integrand + log_weights, 0))


# ---------------------------------------------------------------------------------------------------
# Log-Gaussian Cox process on the Finnish pines (the papers' 1600-D target)


#: the pines data: ``$OSDS_PINES`` if set (e.g. a copy carried to a GPU machine), else the shared data folder's
PINES = Path(os.environ.get("OSDS_PINES") or
             Path(__file__).resolve().parents[2] / "shared" / "data" / "finpines_unit_square.csv")


def lgcp_data(grid: int = 40, path: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The LGCP target of the diffusion-sampler papers (DeepMind's annealed_flow_transport ``lgcp.py``): the 126
    Finnish pines (spatstat.data ``finpines`` rescaled to the unit square; GPL, not copied here: read from
    ``shared/data``, ``$OSDS_PINES`` or ``path``) binned on a ``grid`` x ``grid`` lattice (points on the upper edge in the last
    bin), the prior mean :math:`\mu_0 = \log 126 - 1.91/2` and the exponential covariance
    :math:`K_{mn} = 1.91\,e^{-\|m - n\| / (\text{grid} / 33)}` over integer cell indices. Returns
    ``(counts, mean, scale_tril)``.
    """
    path = Path(path) if path is not None else PINES
    if not path.exists():
        raise FileNotFoundError(f"The pines data ({path}) is not here: it lives in the shared data folder "
                                "(spatstat.data `finpines`, GPL); pass its path.")
    rows = [line.split(",") for line in path.read_text().splitlines()[1:] if line.strip()]
    points = torch.tensor([[float(a), float(b)] for a, b in rows], dtype=D64)
    cells = (points * grid).floor().clamp(max=grid - 1).long()
    counts = torch.zeros(grid, grid, dtype=D64)
    counts.index_put_((cells[:, 0], cells[:, 1]), torch.ones(len(points), dtype=D64), accumulate=True)
    index = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(-1, 2)
    distance = torch.cdist(index.to(D64), index.to(D64))
    variance, length = 1.91, grid / 33.0
    cov = variance * torch.exp(-distance / length)
    mean = torch.full((grid * grid,), math.log(len(points)) - variance / 2, dtype=D64)
    return counts.reshape(-1), mean, torch.linalg.cholesky(cov)


def lgcp_model(counts: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor):
    """The LGCP as a Pyro model: a Gaussian-process log intensity, Poisson counts with cell area 1 / cells."""
    f = pyro.sample("f", dist.MultivariateNormal(mean, scale_tril=scale_tril))
    pyro.sample("counts", dist.Poisson(f.exp() / counts.numel()).to_event(1), obs=counts)


def lgcp_potential(counts: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`lgcp_model`'s potential on ``(batch, D)`` log intensities, normalising constants included."""
    prior = dist.MultivariateNormal(mean, scale_tril=scale_tril)
    log_cells = math.log(counts.numel())

    def potential(f):
        rate = f - log_cells
        return -(prior.log_prob(f) + (counts * rate - rate.exp() - torch.lgamma(counts + 1)).sum(-1))

    return potential


def get_scaling_target(name: str, seed: int = 0) -> ScalingTarget:
    """``logreg<D>``, ``hier<J>`` or ``lgcp<cells>`` (a square grid) (module docstring)."""
    if name.startswith("logreg"):
        dim = int(name.removeprefix("logreg"))
        x, y = _logistic_data(dim, seed)
        return ScalingTarget(name, dim, x.shape[0], logistic_model, (x, y),
                             lambda s, x=x, y=y: laplace_smc_reference(logistic_potential(x, y), x.shape[1], seed=s))
    if name.startswith("hier"):
        groups = int(name.removeprefix("hier"))
        y, sigma = _hierarchical_data(groups, seed)
        return ScalingTarget(name, groups + 2, groups, hierarchical_model, (sigma, y),
                             lambda s, y=y, sigma=sigma: (hierarchical_log_z(y, sigma), 0.0, "exact (quadrature)"))
    if name.startswith("lgcp"):
        cells = int(name.removeprefix("lgcp"))
        grid = math.isqrt(cells)
        if grid * grid != cells:
            raise ValueError(f"lgcp<cells> needs a square number of cells, got {cells}")
        data = lgcp_data(grid)
        return ScalingTarget(name, cells, cells, lgcp_model, data,
                             lambda s, data=data: laplace_smc_reference(lgcp_potential(*data), cells, seed=s))
    raise ValueError(f"unknown scaling target {name!r}: use logreg<D>, hier<J> or lgcp<cells>")


# ---------------------------------------------------------------------------------------------------
# The two samplers


def time_draws(runner: OSDS, draws: int, synchronize=lambda: None) -> tuple[float, float]:
    """Seconds of ``runner.sample(draws)`` on a fitted runner, and of its chains' diagnostic draws: the first
    ``sample`` makes them too (once per trained state), a second one does not; none are made for nearly constant
    weights. ``synchronize``: waits for the device's queued work."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        runner.sample(draws)
        synchronize()
        times.append(time.perf_counter() - start)
    made = any(getattr(chain, "_diagnostic_cache", None) for chain in runner.samplers)
    return times[1], max(times[0] - times[1], 0.0) if made else 0.0


def run_osds(target: ScalingTarget, *, seed: int, draws: int, num_chains: int = 1) -> dict:
    """OSDS with its defaults: fit time, draw-and-weight time, evidence, time to 1000 (Kish) ESS (the fit, the
    diagnostic draws' one pass and the draws that give 1000 ESS)."""
    pyro.set_rng_seed(seed)
    runner = OSDS(target.model, num_chains=num_chains, num_samples=draws, disable_progbar=True)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner.fit(*target.model_args)
        fit_s = time.perf_counter() - start
        draw_s, diagnostic_s = time_draws(runner, draws)
    ev = runner.log_evidence()
    ess = ev.pooled.ess
    total = draws * num_chains
    draws_to_1000 = math.inf if not ess > 0 else 1000.0 * total / ess
    iterations = [int(getattr(sampler, "iteration", 0)) for sampler in runner.samplers]
    stops = [getattr(getattr(sampler, "trainer", None), "stop_reason", None) for sampler in runner.samplers]
    return {
        "fit_s": fit_s, "draw_s": draw_s, "draws": total, "draw_s_per_1000": 1000 * draw_s / total,
        "diagnostic_s": diagnostic_s, "time_to_1000_ess_s": fit_s + diagnostic_s + draw_s * draws_to_1000 / total,
        "num_chains": num_chains, "iterations": max(iterations), "iterations_per_chain": iterations,
        "stop_reasons": stops,
        "log_z": ev.log_z, "se": ev.se, "elbo": ev.pooled.elbo, "ess_per_draw": ev.pooled.ess_per_draw,
        "k_hat": ev.pooled.k_hat, "reliable": bool(ev.reliable), "exact": bool(ev.exact),
        "warnings": sorted({str(w.message).split("\n")[0][:200] for w in caught}),
    }


def run_nuts(target: ScalingTarget, *, seed: int, warmup: int, samples: int) -> dict:
    """Pyro NUTS, one chain: wall clock (warm-up included), smallest bulk ESS, time to 1000 ESS."""
    pyro.set_rng_seed(seed)
    kernel = NUTS(target.model, jit_compile=False)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, num_chains=1, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(*target.model_args)
    wall = time.perf_counter() - start
    flat = torch.cat([v.reshape(samples, -1) for v in mcmc.get_samples().values()], -1)
    ess = metrics.mcmc_ess(flat)
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {"wall_s": wall, "warmup": warmup, "samples": samples, "ess_bulk_min": ess["bulk_min"],
            "ess_bulk_median": ess["bulk_median"], "divergences": divergences,
            "time_to_1000_ess_s": wall * 1000.0 / ess["bulk_min"] if ess["bulk_min"] > 0 else math.inf}


# ---------------------------------------------------------------------------------------------------
# Report


def fmt(value, spec: str) -> str:
    """``value`` in ``spec``, ``-`` when it is missing or not finite."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _slope(rows: list[dict], key: Callable[[dict], float]) -> float | None:
    """Least-squares slope of log(time) against log(D) over the logistic regressions."""
    points = [(math.log(r["dim"]), math.log(key(r))) for r in rows if r["name"].startswith("logreg")
              and key(r) and math.isfinite(key(r)) and key(r) > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / sum((p[0] - mx) ** 2 for p in points)


def write_report(results: dict, out: Path) -> None:
    """``scaling.md`` (the table, slopes, settings) and ``scaling.png`` (log-log time against D)."""
    rows = results["rows"]
    env = results["environment"]
    lines = [
        "# Scaling with the dimension (issue #14)", "",
        f"{results['date']}, {env['machine']['cpu_model']}, torch threads {env['machine']['torch_threads']}, "
        f"torch {env['versions']['torch']}, pyro {env['versions']['pyro']}, commit of the last run "
        f"{env['versions']['git_commit'][:10]} (each row's in the table), "
        f"seed {results['seed']}. One chain each, defaults; `python -m benchmarks.scaling` (module docstring).", "",
        "| target | D | rows | ref log Z | OSDS log Z | Δ / SE | ESS/N | k̂ | reliable | iterations | OSDS fit s "
        "| s per 1000 draws | OSDS to 1000 ESS s | NUTS to 1000 ESS s | OSDS / NUTS | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, n = r["osds"], r.get("nuts")
        delta = o["log_z"] - r["reference"]["log_z"]
        se = math.hypot(o["se"], r["reference"]["se"])
        ratio = o["time_to_1000_ess_s"] / n["time_to_1000_ess_s"] if n else None
        lines.append(
            f"| {r['name']} | {r['dim']} | {r['rows']} | {r['reference']['log_z']:.3f} ± {r['reference']['se']:.3f} "
            f"| {o['log_z']:.3f} ± {o['se']:.3f} | {delta:+.3f} / {delta / se if se > 0 else math.inf:+.1f} "
            f"| {o['ess_per_draw']:.3f} | {o['k_hat']:.2f} | {o['reliable']} | {o['iterations']} | {o['fit_s']:.1f} "
            f"| {o['draw_s_per_1000']:.2f} | {o['time_to_1000_ess_s']:.1f} | {fmt(n and n['time_to_1000_ess_s'], '.1f')} "
            f"| {fmt(ratio, '.2f')} | {(r.get('commit') or '-')[:7]} |")
    osds_slope = _slope(rows, lambda r: r["osds"]["time_to_1000_ess_s"])
    nuts_slope = _slope(rows, lambda r: r["nuts"]["time_to_1000_ess_s"] if r.get("nuts") else math.nan)
    lines += ["", "Log-log slope of the time to 1000 ESS against D over the logistic regressions (work per "
              f"likelihood evaluation grows like D·n = 3D²): OSDS {fmt(osds_slope, '.2f')}, NUTS {fmt(nuts_slope, '.2f')}.",
              "", "References: " + "; ".join(f"{r['name']}: {r['reference']['method']}" for r in rows), ""]
    warned = [(r["name"], w) for r in rows for w in r["osds"]["warnings"]]
    if warned:
        lines += ["OSDS warnings:", ""] + [f"- {name}: {w}" for name, w in warned] + [""]
    (out / "scaling.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the picture is a convenience
        return
    logreg = [r for r in rows if r["name"].startswith("logreg")]
    dims = [r["dim"] for r in logreg]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(dims, [r["osds"]["fit_s"] for r in logreg], "o-", label="OSDS fit")
    ax.loglog(dims, [r["osds"]["time_to_1000_ess_s"] for r in logreg], "s-", label="OSDS to 1000 ESS")
    if all(r.get("nuts") for r in logreg):
        ax.loglog(dims, [r["nuts"]["time_to_1000_ess_s"] for r in logreg], "^-", label="NUTS to 1000 ESS")
    ax.set_xlabel("dimension D (n = 3D rows)")
    ax.set_ylabel("seconds (one CPU thread)")
    ax.set_title("Bayesian logistic regression")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    plt.close(fig)


def results_commands(previous: dict, command: str) -> list[str]:
    """The commands whose rows a results file (its JSON, ``previous``) holds, in order, ending with ``command``:
    rerunning some rows of a report adds its command instead of hiding the earlier ones."""
    earlier = previous.get("commands", [previous["command"]] if "command" in previous else [])
    return [c for c in earlier if c != command] + [command]


def commands_text(commands: list[str]) -> str:
    """``commands`` for a report's header line."""
    return " then ".join(f"`{c}`" for c in commands)


def add_results_arguments(parser: argparse.ArgumentParser, out: str | Path) -> None:
    """The options :func:`start_results` and :func:`run_header` read: ``--seed``, ``--out`` (default ``out``) and
    ``--markdown-only``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the report from the JSON and stop")


def run_header(results: dict) -> str:
    """The date, seed, machine and versions of a :func:`start_results` record, as a report's first line."""
    machine, versions = results["environment"]["machine"], results["environment"]["versions"]
    return (f"{results['date']}, seed {results['seed']}; {machine['cpu_model']} ({machine['cpu_count']} cores), torch "
            f"{versions['torch']}, pyro {versions['pyro']}, commit {(versions.get('git_commit') or '')[:10]}")


def start_results(args: argparse.Namespace, stem: str, names: Sequence[str],
                  write_report: Callable[[dict, Path], None]) -> tuple[Path, dict] | None:
    """The results file ``<args.out>/<stem>.json`` and its record for this run, keeping the rows of earlier runs
    that ``names`` do not replace; with ``--markdown-only``, rewrites the report from the file and returns ``None``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    if args.markdown_only:
        write_report(json.loads(path.read_text()), out)
        return None
    torch.set_num_threads(1)
    previous = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in previous.get("rows", []) if r["name"] not in names]
    return path, {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seed": args.seed,
                  "environment": environment_info(), "settings": vars(args), "rows": kept}


def timed_reference(target: ScalingTarget, seed: int) -> dict:
    """The target's reference log Z, its SE, method and the seconds it took."""
    start = time.perf_counter()
    log_z, se, method = target.reference(seed)
    return {"log_z": log_z, "se": se, "method": method, "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--draws", type=int, default=4000, help="OSDS draws (one chain)")
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=1000)
    parser.add_argument("--no-nuts", action="store_true", help="skip NUTS (the table then has no ratio)")
    add_results_arguments(parser, "benchmarks/results/scaling")
    args = parser.parse_args(argv)
    started = start_results(args, "scaling", args.targets, write_report)
    if started is None:
        return 0
    path, results = started
    out = path.parent
    for name in args.targets:
        target = get_scaling_target(name, args.seed)
        reference = timed_reference(target, args.seed)
        print(f"[{name}] reference {reference['log_z']:.4f} +- {reference['se']:.4f} ({reference['method']}, "
              f"{reference['seconds']:.0f} s)", flush=True)
        row = {"name": name, "dim": target.dim, "rows": target.num_rows, "reference": reference,
               "commit": results["environment"]["versions"]["git_commit"]}
        row["osds"] = run_osds(target, seed=args.seed, draws=args.draws)
        o = row["osds"]
        print(f"[{name}] OSDS fit {o['fit_s']:.1f} s ({o['iterations']} iterations), log Z {o['log_z']:.4f} +- "
              f"{o['se']:.4f}, ESS/N {o['ess_per_draw']:.3f}, to 1000 ESS {o['time_to_1000_ess_s']:.1f} s", flush=True)
        if not args.no_nuts:
            row["nuts"] = run_nuts(target, seed=args.seed, warmup=args.nuts_warmup, samples=args.nuts_samples)
            n = row["nuts"]
            print(f"[{name}] NUTS {n['wall_s']:.1f} s, bulk ESS min {n['ess_bulk_min']:.0f}, to 1000 ESS "
                  f"{n['time_to_1000_ess_s']:.1f} s", flush=True)
        results["rows"].append(row)
        results["rows"].sort(key=lambda r: (not r["name"].startswith("logreg"), r["dim"]))
        path.write_text(json.dumps(results, indent=1))
        write_report(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
