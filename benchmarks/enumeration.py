# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Enumerated discrete sites against the same model marginalised by hand (issue #14).

A two-component Gaussian mixture model (Dirichlet weights, two locations, one assignment per data point) written
twice: with the assignments as an enumerated ``Categorical`` site (``infer={"enumerate": "parallel"}``, Pyro's
``Vindex``), and with ``MixtureSameFamily`` (the assignments summed out by hand). Both are fitted with the
defaults but a fixed training budget (early stopping off, so both train the same number of iterations), two
chains one after the other, one torch thread, in the same run; reported: seconds, the ratio, and log Z (the two
models have the same evidence).

    OMP_NUM_THREADS=1 python -m benchmarks.enumeration --sizes 12 200
    python -m benchmarks.enumeration --markdown-only

Results go to benchmarks/results/enumeration/enumeration.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from pyro_osds import OSDS

from .scaling import add_results_arguments, run_header, start_results

D64 = torch.float64
OUT = Path(__file__).parent / "results" / "enumeration"


def mixture_data(size: int, seed: int) -> torch.Tensor:
    """``size`` points, half around -2 and half around +2 (unit noise)."""
    g = torch.Generator().manual_seed(seed)
    half = size // 2
    return torch.cat([torch.randn(half, dtype=D64, generator=g) - 2, torch.randn(size - half, dtype=D64, generator=g) + 2])


def enumerated(y: torch.Tensor):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=D64)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=D64), 5.0).to_event(1))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., z], 1.0), obs=y)


def marginalised(y: torch.Tensor):
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2, dtype=D64)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=D64), 5.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, 1.0)), obs=y)


def fit(model, y: torch.Tensor, args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    osds = OSDS(model, num_samples=args.num_samples, max_plate_nesting=1, disable_progbar=True, chain_method="sequential",
                early_stopping=False, num_iterations=args.num_iterations).run(y)
    seconds = time.perf_counter() - start
    ev = osds.log_evidence()
    return {"seconds": seconds, "vectorize": osds.target.vectorize, "log_z": ev.log_z, "se": ev.se,
            "ess_per_draw": ev.ess_per_draw, "k_hat": ev.k_hat, "iterations": [s.iteration for s in osds.samplers]}


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Enumerated discrete sites against the model marginalised by hand",
        "",
        f"{run_header(results)}; two chains one after the other, {results['settings']['num_iterations']} iterations each, {results['settings']['num_samples']} "
        "draws per chain, one torch thread.",
        "",
        "| data points | enumerated (s) | marginalised (s) | ratio | log Z enumerated | log Z marginalised | "
        "difference / SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        e, m = row["enumerated"], row["marginalised"]
        diff = (e["log_z"] - m["log_z"]) / max((e["se"] ** 2 + m["se"] ** 2) ** 0.5, 1e-12)
        lines.append(f"| {row['size']} | {e['seconds']:.1f} | {m['seconds']:.1f} | {e['seconds'] / m['seconds']:.2f} | "
                     f"{e['log_z']:.4f} +- {e['se']:.4f} | {m['log_z']:.4f} +- {m['se']:.4f} | {diff:+.1f} |")
    lines.append("")
    (out / "enumeration.md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 200])
    parser.add_argument("--num-iterations", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=2000)
    add_results_arguments(parser, OUT)
    args = parser.parse_args(argv)
    started = start_results(args, "enumeration", [f"n{s}" for s in args.sizes], write_report)
    if started is None:
        return 0
    path, results = started
    for size in args.sizes:
        y = mixture_data(size, args.seed)
        row = {"name": f"n{size}", "size": size, "marginalised": fit(marginalised, y, args),
               "enumerated": fit(enumerated, y, args)}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        path.write_text(json.dumps(results, indent=1))
        write_report(results, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
