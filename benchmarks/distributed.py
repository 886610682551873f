# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Throughput of data-parallel training and sharded drawing over torch.distributed (issue #16).

The same fit of a Bayesian logistic regression (the Pyro model, one chain, a fixed number of training
iterations of a fixed global batch, then a fixed number of draws) runs in one process without a process group
and in N processes of one (``gloo`` on CPUs, spawned here; ``--backend nccl`` on as many GPUs), one torch thread
each, all in the same run. Reported: training iterations per second, draws (with exact weights) per second, both
as ratios of N ranks to one process, and the log Z each run gives (the N-rank one is computed on the union of
the ranks' draws), so that "the same evidence" can be read off. The chains' diagnostic draws are off
(``diagnostic_draws=0``), so the draws timed are the ones asked for.

    OMP_NUM_THREADS=1 python -m benchmarks.distributed --ranks 2 --dims 35 256
    python -m benchmarks.distributed --markdown-only

Results go to benchmarks/results/distributed/distributed.{json,md} (machine, versions and seed recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_osds import OSDS
from pyro_osds.datasets import load_ionosphere

from .scaling import _logistic_data, add_results_arguments, logistic_model, run_header, start_results

OUT = Path(__file__).parent / "results" / "distributed"


def target_data(dim: int, seed: int) -> tuple[str, tuple]:
    """``dim`` 35: the UCI Ionosphere data (34 features + intercept); else a synthetic logistic regression with
    ``3 dim`` rows (as in :mod:`benchmarks.scaling`)."""
    if dim == 35:
        x, y = load_ionosphere(dtype=torch.float64)
        return "ionosphere", (x, y)
    return f"logreg{dim}", _logistic_data(dim, seed)


def worker(rank: int, world_size: int, init_file: str, out_file: str, dim: int, settings: dict) -> None:
    """One rank (or the one process, ``world_size`` 1, without a process group): fits, times, saves."""
    torch.set_num_threads(1)
    backend = settings["backend"]
    if world_size > 1:
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=600))
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    try:
        _, (x, y) = target_data(dim, settings["seed"])
        x, y = x.to(device), y.to(device)
        stamps = []
        torch.manual_seed(settings["seed"])
        osds = OSDS(logistic_model, num_chains=1, num_samples=settings["num_samples"],
                    num_iterations=settings["num_iterations"], batch_size=settings["batch_size"],
                    early_stopping=False, diagnostic_draws=0, disable_progbar=True, device=device,
                    hook_fn=lambda chain, step, info: stamps.append(time.perf_counter()))
        osds.fit(x, y)
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        osds.sample()
        if world_size > 1:
            dist.barrier()
        draw_seconds = time.perf_counter() - start
        ev = osds.log_evidence()
        train_seconds = stamps[-1] - stamps[0]
        if rank == 0:
            torch.save({"iterations_per_second": (len(stamps) - 1) / train_seconds,
                        "draws_per_second": settings["num_samples"] / draw_seconds,
                        "train_seconds": train_seconds, "draw_seconds": draw_seconds,
                        "log_z": ev.log_z, "se": ev.se, "ess_per_draw": ev.ess_per_draw, "k_hat": ev.k_hat,
                        "num_draws": ev.num_draws}, out_file)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_one(dim: int, world_size: int, settings: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        mp.start_processes(worker, args=(world_size, init_file, out_file, dim, settings), nprocs=world_size,
                           start_method="spawn")
        return torch.load(out_file, weights_only=True)


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Data-parallel training and sharded drawing (torch.distributed)",
        "",
        f"{run_header(results)}; backend {results['settings']['backend']}, one torch thread per rank; "
        f"{results['settings']['num_iterations']} iterations of a global batch of "
        f"{results['settings']['batch_size']}, {results['settings']['num_samples']} draws, one chain.",
        "",
        "| target | D | ranks | iterations/s | x one process | draws/s | x one process | log Z | SE | ESS/N | k-hat |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        base = row["runs"]["1"]
        for ranks, run in sorted(row["runs"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {row['name']} | {row['dim']} | {ranks} | {run['iterations_per_second']:.1f} | "
                f"{run['iterations_per_second'] / base['iterations_per_second']:.2f} | "
                f"{run['draws_per_second']:.0f} | {run['draws_per_second'] / base['draws_per_second']:.2f} | "
                f"{run['log_z']:.3f} | {run['se']:.3f} | {run['ess_per_draw']:.3f} | {run['k_hat']:.2f} |")
    lines += ["", "The one-process and N-rank runs train the same sampler (the same noise, gradients summed over "
              "the shards; `tests/test_distributed.py` checks the parameters agree to 1e-9 in float64); their draws "
              "differ (each rank draws from its own stream), so their log Z agree to Monte Carlo error.", ""]
    (out / "distributed.md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--dims", type=int, nargs="+", default=[35, 256],
                        help="35: Ionosphere; any other D: a synthetic logistic regression with 3 D rows")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="world sizes besides one process")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--num-iterations", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-samples", type=int, default=4000)
    add_results_arguments(parser, OUT)
    args = parser.parse_args(argv)
    names = [target_data(d, args.seed)[0] for d in args.dims]
    started = start_results(args, "distributed", names, write_report)
    if started is None:
        return 0
    path, results = started
    settings = {"backend": args.backend, "num_iterations": args.num_iterations, "batch_size": args.batch_size,
                "num_samples": args.num_samples, "seed": args.seed}
    for dim, name in zip(args.dims, names, strict=True):
        runs = {}
        for world_size in [1, *args.ranks]:
            runs[str(world_size)] = run_one(dim, world_size, settings)
            print(f"{name} ranks={world_size}: {json.dumps(runs[str(world_size)])}", flush=True)
        results["rows"].append({"name": name, "dim": dim, "runs": runs})
        path.write_text(json.dumps(results, indent=1))
        write_report(results, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
