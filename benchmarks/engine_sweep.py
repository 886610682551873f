# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The engine's step-budget sweep (issue #2): for a 10-D funnel and a 5-D anisotropic shifted Gaussian
(both with exact log Z), train one sampler and report, at :math:`K = 1, 2, 4, \dots, T`, the log Z
error, ELBO, ESS/N, Pareto k-hat and folded draws of the deterministic-flow (DF, exact log-det)
weights, of the OSDS authors' Euler-Hutchinson DF weights (one probe) and of the Euler-Maruyama path
weights, plus the training time.

The paper's objective (EM paths + self-distillation + volume consistency) trains every step size, so
it is the one swept (``--preset paper-cpu``, or ``--preset cpu --flow-kl-steps 1 2 4`` for the
one-step objective).

``python -m benchmarks.engine_sweep --grid-size 128 --iterations 600 --out benchmarks/results/engine_sweep.md``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from pyro_osds import __version__
from pyro_osds.config import OSDSConfig
from pyro_osds.ops.estimators import evidence
from pyro_osds.samplers import FlowSampler

from .targets import get_target

D64 = torch.float64


def gaussian_5d():
    """An anisotropic, shifted 5-D Gaussian (correlated) with its exact log Z."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=D64)
    cov = a @ a.T / 5 + 0.3 * torch.eye(5, dtype=D64)
    mean = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=D64)
    prec = torch.linalg.inv(cov)

    def potential(x):
        r = x - mean
        return 0.5 * ((r @ prec) * r).sum(-1)

    log_z = 0.5 * 5 * math.log(2 * math.pi) + 0.5 * float(torch.logdet(cov))
    return potential, 5, log_z


def sweep(name, potential, dim, log_z, config, num_draws, seed):
    torch.manual_seed(seed)
    sampler = FlowSampler(potential, torch.zeros(dim, dtype=D64), config, disable_progbar=True,
                          generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    sampler.fit()
    train_s = time.perf_counter() - t0
    rows = []
    k = 1
    while k <= config.process.grid_size:
        for kind in ("exact", "hutchinson", "em"):
            t0 = time.perf_counter()
            if kind == "em":
                est = sampler.em_evidence(num_draws, k)
            else:
                draws = sampler.draw(num_draws, k, log_det=kind, num_probes=1)
                est = evidence(draws.log_weight, num_folded=draws.num_folded, log_det=kind)
            rows.append({"target": name, "K": k, "weights": kind, "log_z_error": est.log_z - log_z, "se": est.se,
                         "elbo_minus_log_z": est.elbo - log_z, "ess_per_draw": est.ess_per_draw, "k_hat": est.k_hat,
                         "folded": est.num_folded, "seconds": time.perf_counter() - t0})
        k *= 2
    return train_s, rows


def markdown(results: dict) -> str:
    lines = ["# Engine sweep: DF (exact), Euler-Hutchinson DF and EM weights across step budgets", "",
             f"pyro_osds {results['version']}, torch {results['torch']}, {results['machine']}, "
             f"seed {results['seed']}, {results['num_draws']} draws per cell; config: "
             f"`{json.dumps(results['config_changes'])}` on preset `{results['preset']}`.", ""]
    for name, block in results["targets"].items():
        lines += [f"## {name} (training {block['train_s']:.0f} s)", "",
                  "| K | weights | log Z error ± SE | ELBO − log Z | ESS/N | k-hat | folded |",
                  "|---|---|---|---|---|---|---|"]
        for r in block["rows"]:
            lines.append(f"| {r['K']} | {r['weights']} | {r['log_z_error']:+.3f} ± {r['se']:.3f} | "
                         f"{r['elbo_minus_log_z']:+.3f} | {r['ess_per_draw']:.3g} | {r['k_hat']:.2f} | {r['folded']} |")
        lines.append("")
    lines += ["`exact`: the exact log-det of every discrete step (ours); `hutchinson`: the OSDS code's Euler rule "
              "with one Rademacher probe and the Langevin input held constant; `em`: Euler-Maruyama path weights. "
              "An ELBO above log Z (a positive ELBO − log Z beyond its noise) is an invalid bound.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper-cpu")
    p.add_argument("--grid-size", type=int, default=128)
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--flow-kl-steps", type=int, nargs="+", default=None)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_sweep.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    changes = {"grid_size": args.grid_size, "num_iterations": args.iterations, "dtype": None,
               "sd_warmup": max(args.iterations // 10, 1)}
    if args.flow_kl_steps:
        changes["flow_kl_steps"] = tuple(args.flow_kl_steps)
    config = OSDSConfig.preset(args.preset, **changes)
    funnel = get_target("funnel10")
    targets = {"funnel10": (funnel.potential, funnel.dim, 0.0), "gaussian5": gaussian_5d()}
    results = {"version": __version__, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "seed": args.seed, "num_draws": args.draws, "preset": args.preset, "config_changes": changes,
               "targets": {}}
    for name, (potential, dim, log_z) in targets.items():
        train_s, rows = sweep(name, potential, dim, log_z, config, args.draws, args.seed)
        results["targets"][name] = {"train_s": train_s, "rows": rows}
        print(f"{name}: trained in {train_s:.0f} s", flush=True)
        for r in rows:
            print(f"  K={r['K']:3d} {r['weights']:10s} err {r['log_z_error']:+8.3f} ± {r['se']:.3f} "
                  f"ELBO-logZ {r['elbo_minus_log_z']:+8.3f} ESS/N {r['ess_per_draw']:.3g} k {r['k_hat']:.2f} "
                  f"folded {r['folded']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
