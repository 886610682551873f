# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
OSDS on a GPU against NUTS on the same machine's CPU (issue #23), in one run of under eight minutes on an
H200-class GPU.

.. code-block:: bash

    python -m benchmarks.gpu --out benchmarks/results/gpu            # on the GPU machine
    python -m benchmarks.gpu --device cpu --targets logreg32 --quick  # a dry run anywhere

For each target of :mod:`benchmarks.scaling` (default ``logreg32 logreg256 logreg1024 hier1000 lgcp1600``), the
data are made on the CPU with the scaling benchmark's seed and moved to ``--device``, and OSDS runs there with its
defaults (``--chains`` chains, trained one after the other on a GPU); its *time to 1000 ESS* is the fit time plus
the draw-and-weight time of the draws that give a Kish ESS of 1000. Recorded with it: the peak device memory, the
time of one training iteration (``--iterations`` more iterations of a trained chain, the device synchronised before
and after), the log Z error against the reference of :mod:`benchmarks.scaling`'s report (the same data; tempered
SMC or exact quadrature, computed there on a CPU) and the host's reads of the device per iteration.

NUTS (Pyro, one chain, ``--nuts-warmup`` + ``--nuts-samples``, one CPU thread each, ``jit_compile=False``: NUTS at
its best on these models) runs at the same time in separate processes on the machine's other CPU cores, one per
target of ``--nuts-targets``, so that the ratio OSDS / NUTS is measured in the same run.

Writes ``<out>/gpu.json`` and ``<out>/gpu.md`` (the GPU's name, torch and CUDA versions, the commit), rewritten
after every target and every NUTS result, so that a run cut short by its time limit keeps what it measured (NUTS is
waited for until ``--deadline`` seconds after the start). ``--profile`` targets get a :mod:`torch.profiler` table of
``--iterations`` training iterations (the operators by device time and by host time, with the host's reads of the
device: ``aten::_local_scalar_dense``, ``cudaStreamSynchronize``, device-to-host copies) in ``<out>/profile.txt``.

Installing on a GPU machine without internet access: carry the missing packages as wheels (``pyro-ppl``,
``pyro-api``, ``arviz``, ``xarray-einstats``, ``h5netcdf``, ``platformdirs``; ``benchmarks/gpu_check.sh`` shows
the commands), add them to ``PYTHONPATH`` and run from the repository's root.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import math
import multiprocessing
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .methods import synchronize
from .run import environment_info

DEFAULT_TARGETS = ("logreg32", "logreg256", "logreg1024", "hier1000", "lgcp1600")
DEFAULT_NUTS = ("logreg256", "logreg1024", "hier1000")
SCALING_REPORT = Path(__file__).parent / "results" / "scaling" / "scaling.json"


def environment(device: torch.device) -> dict:
    """The machine and versions (:func:`benchmarks.run.environment_info`), with the device and its memory."""
    info = {**environment_info(), "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def references() -> dict:
    """The reference log Z of each target of the scaling benchmark's report (seed 0), by name."""
    if not SCALING_REPORT.exists():
        return {}
    rows = json.loads(SCALING_REPORT.read_text())["rows"]
    return {row["name"]: row["reference"] for row in rows if "reference" in row}


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def profile_iterations(trainer, device: torch.device, iterations: int) -> str:
    """A :mod:`torch.profiler` table of ``iterations`` training iterations on ``device`` (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        trainer.train(iterations)
        synchronize(device)
    averages = prof.key_averages()
    lines = [f"{iterations} iterations; calls per iteration: " + ", ".join(
        f"{e.key} {e.count / iterations:.1f}" for e in averages if e.key in _HOST_READS)]
    device_keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()
    for keys in (device_keys, ("self_cpu_time_total",)):
        for key in keys:  # torch >= 2.5 names the device column "device", older ones "cuda"
            try:
                lines += [f"sorted by {key}", averages.table(sort_by=key, row_limit=30, max_name_column_width=60)]
                break
            except (AttributeError, KeyError, ValueError, RuntimeError):
                continue
    return "\n".join(lines)


def profile_fit(model, model_args, device: torch.device, seed: int) -> str:
    """A :mod:`torch.profiler` summary of one chain's fit: each phase's host and device time (the ``osds:<phase>``
    labels of :class:`~pyro_osds.cost.CostMeter`), the host's reads of the device and the kernel launches."""
    import pyro
    from torch.profiler import ProfilerActivity, profile

    from pyro_osds import OSDS

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    pyro.set_rng_seed(seed)
    runner = OSDS(model, num_chains=1, disable_progbar=True)
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        runner.fit(*model_args)
        synchronize(device)
    seconds = time.perf_counter() - start
    averages = prof.key_averages()
    lines = [f"one chain's fit under the profiler: {seconds:.1f} s, {runner.samplers[0].iteration} iterations"]
    for e in averages:
        device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if e.key.startswith("osds:") or e.key in _HOST_READS:
            lines.append(f"  {e.key}: {e.count} calls, host {e.cpu_time_total / 1e6:.2f} s, "
                         f"device {device_us / 1e6:.2f} s")
    return "\n".join(lines)


_HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "cudaStreamSynchronize",
               "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")


def run_osds(name: str, device: torch.device, *, seed: int, draws: int, chains: int, iterations: int,
             profile: Path | None = None, chain_method: str = "auto") -> dict:
    """OSDS with its defaults on ``device`` (module docstring); with ``profile``, appends a profile there;
    ``chain_method`` as :class:`~pyro_osds.OSDS` takes it."""
    import pyro

    from pyro_osds import OSDS

    from .scaling import get_scaling_target, time_draws

    target = get_scaling_target(name, seed)
    model_args = _to(target.model_args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pyro.set_rng_seed(seed)
    runner = OSDS(target.model, num_chains=chains, num_samples=draws, disable_progbar=True, chain_method=chain_method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        synchronize(device)
        start = time.perf_counter()
        runner.fit(*model_args)
        synchronize(device)
        fit_s = time.perf_counter() - start
        draw_s, diagnostic_s = time_draws(runner, draws, lambda: synchronize(device))
    ev = runner.log_evidence()
    total = draws * chains
    draws_to_1000 = 1000.0 * total / ev.pooled.ess if ev.pooled.ess > 0 else math.inf
    trainer = runner.samplers[0].trainer if hasattr(runner.samplers[0], "trainer") else None
    per_iteration = math.nan
    if trainer is not None and iterations > 0:  # more iterations of the trained chain, timed alone
        synchronize(device)
        start = time.perf_counter()
        trainer.train(iterations)
        synchronize(device)
        per_iteration = (time.perf_counter() - start) / iterations
        if profile is not None:
            with profile.open("a") as fh:
                fh.write(f"## {name} (D = {target.dim}) on {device}\n{profile_fit(target.model, model_args, device, seed)}"
                         f"\n{profile_iterations(trainer, device, iterations)}\n\n")
    return {
        "device": str(device), "dim": target.dim, "fit_s": fit_s, "draw_s": draw_s, "draws": total,
        "diagnostic_s": diagnostic_s, "time_to_1000_ess_s": fit_s + diagnostic_s + draw_s * draws_to_1000 / total,
        "iterations": [int(s.iteration) for s in runner.samplers], "seconds_per_iteration": per_iteration,
        "sync_every": trainer.sync_every if trainer is not None else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "log_z": ev.log_z, "se": ev.se, "ess_per_draw": ev.pooled.ess_per_draw, "k_hat": ev.pooled.k_hat,
        "reliable": bool(ev.reliable), "vectorize": getattr(runner.target, "vectorize", None),
        "chain_method": chain_method, "cost": ev.cost.as_dict() if ev.cost is not None else None,
        "warnings": sorted({str(w.message).split("\n")[0][:200] for w in caught}),
    }


def _nuts_job(name: str, seed: int, warmup: int, samples: int) -> dict:
    """Pyro NUTS on the CPU, one thread (in its own process)."""
    torch.set_num_threads(1)
    from .scaling import get_scaling_target, run_nuts

    return run_nuts(get_scaling_target(name, seed), seed=seed, warmup=warmup, samples=samples)


def _phases(o: dict) -> str:
    """`` (a + b + c)``: the chains' seconds in search, preconditioner and training (summed over chains)."""
    cost = o.get("cost") or {}
    seconds = [cost.get(f"{phase}_seconds") for phase in ("search", "preconditioner", "training")]
    return "" if None in seconds else " (" + " + ".join(f"{v:.1f}" for v in seconds) + ")"


def write_report(results: dict, out: Path) -> None:
    from .scaling import fmt

    env = results["environment"]
    versions = env["versions"]
    lines = [
        "# OSDS on a GPU against NUTS on the CPU (issue #23)", "",
        f"{results['date']}, seed {results['seed']}; {env.get('gpu', env['device'])} "
        f"({env.get('gpu_memory_gib', '-')} GiB), torch {versions['torch']} (CUDA {env['cuda']}), pyro "
        f"{versions['pyro']}, {env['machine']['cpu_count']} CPU cores, commit {(versions['git_commit'] or '-')[:10]}. "
        "OSDS: defaults, "
        f"{results['settings']['chains']} chains in turn on `{env['device']}`; NUTS: one chain on one CPU core, "
        f"{results['settings']['nuts_warmup']} + {results['settings']['nuts_samples']}, at the same time. "
        "`python -m benchmarks.gpu` (module docstring).", "",
        "| target | D | ref log Z | OSDS log Z | Δ | ESS/N | k̂ | fit s (search + preconditioner + training) "
        "| ms / iteration | peak GiB | OSDS to 1000 ESS s | NUTS to 1000 ESS s | OSDS / NUTS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        o, ref, nuts = row["osds"], row.get("reference") or {}, row.get("nuts") or {}
        delta = o["log_z"] - ref["log_z"] if "log_z" in ref else None
        ratio = o["time_to_1000_ess_s"] / nuts["time_to_1000_ess_s"] if nuts.get("time_to_1000_ess_s") else None
        label = row["name"] + (f" ({o['chain_method']})" if o.get("chain_method", "auto") != "auto" else "")
        lines.append(
            f"| {label} | {o['dim']} | {fmt(ref.get('log_z'), '.3f')} | {o['log_z']:.3f} ± {o['se']:.3f} "
            f"| {fmt(delta, '+.3f')} | {o['ess_per_draw']:.3f} | {o['k_hat']:.2f} | {o['fit_s']:.1f}{_phases(o)} "
            f"| {fmt(1000 * o['seconds_per_iteration'], '.1f')} | {fmt(o['peak_memory_gib'], '.2f')} "
            f"| {o['time_to_1000_ess_s']:.1f} | {fmt(nuts.get('time_to_1000_ess_s'), '.1f')} | {fmt(ratio, '.3f')} |")
    lines += ["", "References: the scaling benchmark's (`benchmarks/results/scaling/scaling.json`, the same data)."]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def _save(results: dict, out: Path) -> None:
    """Writes the JSON and the Markdown report of what was measured so far (failed targets last)."""
    rows = [r for r in results["rows"] if "osds" in r]
    (out / "gpu.json").write_text(json.dumps({**results, "rows": rows + [r for r in results["rows"]
                                                                         if "osds" not in r]},
                                             indent=1, default=str))
    write_report({**results, "rows": rows}, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--nuts-targets", nargs="*", default=list(DEFAULT_NUTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--draws", type=int, default=4000, help="OSDS draws per chain")
    parser.add_argument("--iterations", type=int, default=50, help="iterations timed alone")
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="a dry run: few draws, short NUTS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--profile", nargs="*", default=[], help="targets whose training iterations are profiled")
    parser.add_argument("--threads", nargs="*", default=[],
                        help="targets run again with chain_method='threads' (the chains at once on the device)")
    parser.add_argument("--warm-up", action="store_true", help="an untimed smoke run first (the device's start-up)")
    parser.add_argument("--deadline", type=float, default=math.inf,
                        help="seconds from the start after which NUTS is no longer waited for")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the report from the JSON and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        write_report(json.loads((out / "gpu.json").read_text()), out)
        return 0
    if args.quick:
        args.draws, args.iterations, args.nuts_warmup, args.nuts_samples = 500, 5, 100, 200
    device = torch.device(args.device)
    nuts_targets = [t for t in args.nuts_targets if t in args.targets]
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "seed": args.seed,
               "environment": environment(device), "settings": vars(args), "rows": []}
    refs = references()
    started = time.perf_counter()
    profile_path = out / "profile.txt"
    if args.profile:
        profile_path.unlink(missing_ok=True)
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max(1, len(nuts_targets)), mp_context=context)
    nuts = {name: pool.submit(_nuts_job, name, args.seed, args.nuts_warmup, args.nuts_samples)
            for name in nuts_targets}
    if args.warm_up:  # CUDA's context, its libraries' handles and kernels' first loads, outside every timing
        run_osds("logreg32", device, seed=args.seed, draws=200, chains=1, iterations=0)
    runs = [(name, "auto") for name in args.targets] + [(name, "threads") for name in args.threads]
    for name, chain_method in runs:
        row = {"name": name, "reference": refs.get(name)}
        try:
            row["osds"] = run_osds(name, device, seed=args.seed, draws=args.draws, chains=args.chains,
                                   iterations=args.iterations, chain_method=chain_method,
                                   profile=profile_path if name in args.profile and chain_method == "auto" else None)
        except Exception as err:  # noqa: BLE001 - a failing target is reported, the others still run
            row["error"] = f"{type(err).__name__}: {err}"
        o = row.get("osds")
        print(f"[{name} {chain_method}] " + (row["error"] if o is None else
                              f"log Z {o['log_z']:.3f} +- {o['se']:.3f}, fit {o['fit_s']:.1f} s, "
                              f"{1000 * o['seconds_per_iteration']:.1f} ms/iteration, to 1000 ESS "
                              f"{o['time_to_1000_ess_s']:.1f} s"), flush=True)
        results["rows"].append(row)
        _save(results, out)
    for row in results["rows"]:
        if row["name"] in nuts:
            remaining = args.deadline - (time.perf_counter() - started)
            try:
                row["nuts"] = nuts[row["name"]].result(timeout=max(remaining, 0.0) if remaining < 1e9 else None)
            except concurrent.futures.TimeoutError:
                row["nuts"] = {"error": f"not finished {args.deadline:.0f} s after the start"}
            except Exception as err:  # noqa: BLE001
                row["nuts"] = {"error": f"{type(err).__name__}: {err}"}
            print(f"[{row['name']}] NUTS {row['nuts'].get('time_to_1000_ess_s', row['nuts'].get('error'))}",
                  flush=True)
            _save(results, out)
    pool.shutdown(wait=False, cancel_futures=True)
    if not all(f.done() for f in nuts.values()):  # past the deadline: end the NUTS processes, not wait at exit
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
