# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Faster than NUTS end to end? Everyday Pyro models, both samplers with their defaults, in the same run (issue #14).

.. code-block:: bash

    OMP_NUM_THREADS=1 python -m benchmarks.end_to_end --out benchmarks/results/end_to_end

*OSDS* (two chains, the defaults, so trained at once in two forked processes): the time to fit, plus the chains' diagnostic
draws (one pass per trained sampler), plus the draw-and-weight time of the draws that give a Kish ESS of 1000. *NUTS* (Pyro, one chain, ``--nuts-warmup`` + ``--nuts-samples``, ``jit_compile=False``):
the wall clock, warm-up included, times 1000 over the smallest bulk ESS over coordinates. Both are measured
in the same run, one after the other, one torch thread each; the ratio is what to read (these machines
are noisy). The models, with their reference :math:`\log Z`:

* ``linear``: linear regression, 100 rows, intercept + 5 features, :math:`\beta \sim N(0, 2^2 I)`,
  :math:`\sigma \sim \mathrm{HalfNormal}(1)` (7 latents); exact by integrating :math:`\beta` in closed form
  and :math:`\log\sigma` by quadrature;
* ``poisson``: Poisson GLM, 200 rows, intercept + 4 features, :math:`\beta \sim N(0, I)` (5 latents);
  tempered SMC from the Laplace fit;
* ``hier_logistic``: hierarchical logistic regression, 50 groups of 10 rows, a random intercept per group
  :math:`b_j \sim N(\mu, \tau^2)` (centred), a shared slope, :math:`\mu \sim N(0, 2^2)`,
  :math:`\tau \sim \mathrm{HalfNormal}(1)` (53 latents); no reference (the joint density has no mode);
* ``eight_schools``: the centred eight schools (Rubin 1981), :math:`\tau \sim \mathrm{HalfCauchy}(5)`
  (10 latents); exact by quadrature over :math:`\tau`;
* ``ionosphere``, ``sonar``: logistic regressions on the bundled UCI data (35 and 61 latents);
  ``benchmarks/references.json``;
* ``german_credit``, ``breast_cancer``: logistic regressions on the German credit (1000 rows, 25 latents) and
  Wisconsin breast cancer (569 rows, 31 latents) data; ``benchmarks/references.json``;
* ``mixture_enum``: the two-component Gaussian mixture model of :mod:`benchmarks.enumeration` on 200 points, its
  assignments an enumerated discrete site (weights and locations: 3 latents; two label-switching modes, NUTS
  stays in one, which does not change its ESS); tempered SMC from the Laplace fit at one labelling of the
  model marginalised by hand, plus :math:`\log 2` for its mirror image (the prior is symmetric and the two
  modes are far apart).

Writes ``<out>/end_to_end.json`` and ``<out>/end_to_end.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from pyro_osds.model import build_target

from .enumeration import enumerated as enumerated_mixture
from .enumeration import marginalised as marginalised_mixture
from .enumeration import mixture_data
from .methods import load_references
from .scaling import (
    ScalingTarget,
    add_results_arguments,
    hierarchical_log_z,
    laplace_smc_reference,
    run_nuts,
    run_osds,
    start_results,
    timed_reference,
)
from .targets import get_target

D64 = torch.float64
DEFAULT_MODELS = ("linear", "poisson", "hier_logistic", "eight_schools", "ionosphere", "sonar", "mixture_enum",
                  "german_credit", "breast_cancer")
LINEAR_PRIOR_SD = 2.0


def linear_model(x, y=None):
    """Linear regression with unknown noise scale."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), LINEAR_PRIOR_SD).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ beta, sigma), obs=y)


def linear_log_z(x: torch.Tensor, y: torch.Tensor, num_points: int = 4001) -> float:
    r"""Exact :math:`\log p(y)` of :func:`linear_model`: :math:`y \mid \sigma \sim N(0, s^2 XX^\top + \sigma^2 I)`,
    then the trapezoid rule over :math:`\log\sigma`."""
    log_sigma = torch.linspace(-8.0, 3.0, num_points, dtype=D64)
    sigma = log_sigma.exp()
    n = x.shape[0]
    cov = LINEAR_PRIOR_SD**2 * (x @ x.T) + sigma[:, None, None] ** 2 * torch.eye(n, dtype=D64)
    log_lik = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=D64), cov).log_prob(y)
    log_prior = dist.HalfNormal(torch.tensor(1.0, dtype=D64)).log_prob(sigma) + log_sigma
    step = float(log_sigma[1] - log_sigma[0])
    log_w = torch.full_like(log_sigma, math.log(step))
    log_w[[0, -1]] = math.log(step / 2)
    return float(torch.logsumexp(log_lik + log_prior + log_w, 0))


def poisson_model(x, y=None):
    """Poisson regression with a log link."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Poisson((x @ beta).exp()), obs=y)


def poisson_potential(x: torch.Tensor, y: torch.Tensor):
    def potential(beta):
        rate = beta @ x.T
        log_lik = (y * rate - rate.exp() - torch.lgamma(y + 1)).sum(-1)
        return 0.5 * (beta**2).sum(-1) + 0.5 * x.shape[1] * math.log(2 * math.pi) - log_lik

    return potential


def hier_logistic_model(group, x, y=None, num_groups: int = 50):
    """Random intercepts per group (centred), one shared slope."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 2.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0, dtype=x.dtype)))
    slope = pyro.sample("slope", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 2.0))
    with pyro.plate("groups", num_groups):
        b = pyro.sample("b", dist.Normal(mu, tau))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=b[..., group] + slope * x), obs=y)


def eight_schools_model(sigma, y=None):
    """The centred eight schools."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=sigma.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=sigma.dtype)))
    with pyro.plate("schools", sigma.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def get_model(name: str, seed: int = 0) -> ScalingTarget:
    """One of :data:`DEFAULT_MODELS` with its data and reference (module docstring)."""
    gen = torch.Generator().manual_seed(3000 + seed)
    if name == "linear":
        x = torch.cat([torch.ones(100, 1, dtype=D64), torch.randn(100, 5, dtype=D64, generator=gen)], 1)
        y = x @ torch.tensor([1.0, 0.5, -1.0, 0.0, 2.0, 0.3], dtype=D64) + 0.7 * torch.randn(100, dtype=D64,
                                                                                            generator=gen)
        return ScalingTarget(name, 7, 100, linear_model, (x, y),
                             lambda s, x=x, y=y: (linear_log_z(x, y), 0.0, "exact (quadrature over log sigma)"))
    if name == "poisson":
        x = torch.cat([torch.ones(200, 1, dtype=D64), 0.5 * torch.randn(200, 4, dtype=D64, generator=gen)], 1)
        y = torch.poisson((x @ torch.tensor([1.0, 0.4, -0.3, 0.2, 0.0], dtype=D64)).exp(), generator=gen)
        return ScalingTarget(name, 5, 200, poisson_model, (x, y),
                             lambda s, x=x, y=y: laplace_smc_reference(poisson_potential(x, y), 5, seed=s))
    if name == "hier_logistic":
        group = torch.arange(50).repeat_interleave(10)
        b = -0.5 + 0.8 * torch.randn(50, dtype=D64, generator=gen)
        x = torch.randn(500, dtype=D64, generator=gen)
        y = torch.bernoulli(torch.sigmoid(b[group] + 0.7 * x), generator=gen)
        return ScalingTarget(name, 53, 500, hier_logistic_model, (group, x, y),
                             lambda s: (math.nan, math.nan, "none (no closed form; the joint density has no mode)"))
    if name == "eight_schools":
        y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=D64)
        sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=D64)
        return ScalingTarget(
            name, 10, 8, eight_schools_model, (sigma, y),
            lambda s: (hierarchical_log_z(y, sigma, loc_sd=5.0, tau_prior=dist.HalfCauchy(torch.tensor(5.0, dtype=D64))),
                       0.0, "exact (quadrature over log tau)"))
    if name in ("ionosphere", "sonar", "german_credit", "breast_cancer"):
        target = get_target(name)
        ref = load_references()[name]
        return ScalingTarget(name, target.dim, target.model_args[0].shape[0], target.model, target.model_args,
                             lambda s, ref=ref: (ref["log_z"], ref["se"], "benchmarks/references.json"))
    if name == "mixture_enum":
        y = mixture_data(200, seed)
        return ScalingTarget(name, 3, 200, enumerated_mixture, (y,), lambda s, y=y: mixture_log_z(y, s))
    raise ValueError(f"unknown model {name!r}; choose from {DEFAULT_MODELS}")


def mixture_log_z(y: torch.Tensor, seed: int) -> tuple[float, float, str]:
    """The reference of ``mixture_enum`` (module docstring): one labelling by tempered SMC, plus log 2."""
    target, _, _ = build_target(marginalised_mixture, args=(y,))
    start = torch.zeros(target.dim, dtype=D64)  # weights 1/2 each (stick-breaking 0), locations -2 and +2
    locs = next(site for site in target.sites if site.name == "locs")
    start[locs.start:locs.stop] = torch.tensor([-2.0, 2.0], dtype=D64)
    log_z, se, method = laplace_smc_reference(target.potential, target.dim, seed=seed, start=start)
    return log_z + math.log(2), se, f"{method} at one labelling, + log 2 for its mirror image"


def write_report(results: dict, out: Path) -> None:
    env = results["environment"]
    lines = [
        "# End to end against NUTS (issue #14)", "",
        f"{results['date']}, {env['machine']['cpu_model']}, torch threads {env['machine']['torch_threads']}, torch "
        f"{env['versions']['torch']}, pyro {env['versions']['pyro']}, commit of the last run {env['versions']['git_commit'][:10]} (each row's in the table), seed "
        f"{results['seed']}. OSDS: defaults, {results['settings']['chains']} chains (trained at once, a process each: `chain_method`), "
        "time to fit + draw and weight until a Kish ESS of 1000. NUTS: one chain, "
        f"{results['settings']['nuts_warmup']} + {results['settings']['nuts_samples']}, wall clock x 1000 / min bulk ESS. "
        "`python -m benchmarks.end_to_end` (module docstring).", "",
        "| model | D | ref log Z | OSDS log Z | Δ / SE | ESS/N | k̂ | reliable | iterations | OSDS fit s "
        "| OSDS to 1000 ESS s | NUTS to 1000 ESS s (divergences) | OSDS / NUTS | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        o, n, ref = r["osds"], r["nuts"], r["reference"]
        if math.isfinite(ref["log_z"]):
            delta = o["log_z"] - ref["log_z"]
            se = math.hypot(o["se"], ref["se"])
            ref_text, delta_text = f"{ref['log_z']:.3f} ± {ref['se']:.3f}", f"{delta:+.3f} / {delta / se:+.1f}"
        else:
            ref_text = delta_text = "-"
        lines.append(
            f"| {r['name']} | {r['dim']} | {ref_text} | {o['log_z']:.3f} ± {o['se']:.3f} | {delta_text} "
            f"| {o['ess_per_draw']:.3f} | {o['k_hat']:.2f} | {o['reliable']} | {o['iterations']} | {o['fit_s']:.1f} "
            f"| {o['time_to_1000_ess_s']:.1f} | {n['time_to_1000_ess_s']:.1f} ({n['divergences']}) "
            f"| {o['time_to_1000_ess_s'] / n['time_to_1000_ess_s']:.2f} | {(r.get('commit') or '-')[:7]} |")
    lines += ["", "References: " + "; ".join(f"{r['name']}: {r['reference']['method']}" for r in results["rows"]), ""]
    (out / "end_to_end.md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=2000, help="OSDS draws per chain")
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=1000)
    add_results_arguments(parser, "benchmarks/results/end_to_end")
    args = parser.parse_args(argv)
    started = start_results(args, "end_to_end", args.models, write_report)
    if started is None:
        return 0
    path, results = started
    out = path.parent
    rows = {r["name"]: r for r in results["rows"]}
    for name in args.models:
        case = get_model(name, args.seed)
        row = {"name": name, "dim": case.dim, "rows": case.num_rows, "commit": results["environment"]["versions"]["git_commit"],
               "reference": timed_reference(case, args.seed)}
        row["osds"] = run_osds(case, seed=args.seed, draws=args.draws, num_chains=args.chains)
        row["nuts"] = run_nuts(case, seed=args.seed, warmup=args.nuts_warmup, samples=args.nuts_samples)
        o, n = row["osds"], row["nuts"]
        print(f"[{name}] ref {row['reference']['log_z']:.3f}; OSDS {o['log_z']:.3f} +- {o['se']:.3f} (ESS/N {o['ess_per_draw']:.3f}, "
              f"fit {o['fit_s']:.1f} s, to 1000 ESS {o['time_to_1000_ess_s']:.1f} s); NUTS to 1000 ESS "
              f"{n['time_to_1000_ess_s']:.1f} s", flush=True)
        rows[name] = row
        results["rows"] = [rows[m] for m in DEFAULT_MODELS if m in rows] + [
            r for k, r in rows.items() if k not in DEFAULT_MODELS]
        path.write_text(json.dumps(results, indent=1))
        write_report(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
