# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Command-line entry point of the benchmark harness.

.. code-block:: bash

    OMP_NUM_THREADS=1 python -m benchmarks.run --targets funnel10 ionosphere \
        --methods osds dis nuts svi_is laplace_is --preset cpu --seed 0 --out benchmarks/results/cpu

For every (target, method) it writes ``<out>/<target>__<method>.json`` (results, method
configuration, machine, versions, git commit, seed, preset, date, wall-clock timings, warnings) and
then regenerates ``<out>/report.md`` from all JSON files in ``<out>`` (:mod:`benchmarks.report`),
so runs can be added incrementally. NUTS runs first for each target; its draws (saved under
``<out>/draws/``) are the reference draws of the Bayesian targets for the other methods, also in
later invocations with the same ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .methods import (
    DEFAULT_METHODS,
    METHOD_NAMES,
    SMALL_TARGETS,
    RunContext,
    build_reference,
    get_preset,
    load_references,
    run_method,
)
from .report import write_report
from .targets import TARGETS, get_target

__all__ = ["environment_info", "main", "run_benchmarks", "to_jsonable"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed
        return None


def environment_info() -> dict:
    """Machine (platform, CPU model, cores, torch threads, load) and versions (incl. the git commit)."""
    import pyro

    import pyro_osds

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    status = _git("status", "--porcelain", "--", "pyro_osds", "benchmarks")
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load,
    }
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_osds": pyro_osds.__version__,
        "numpy": np.__version__,
        "scipy": _package_version("scipy"),
        "arviz": _package_version("arviz"),
        "pot": _package_version("pot"),
        # OSDS_COMMIT: the commit of a copy of the repository whose git history is absent or stale (a GPU machine's)
        "git_commit": os.environ.get("OSDS_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }
    return {"machine": machine, "versions": versions}


def to_jsonable(obj):
    """Plain JSON types: tensors / arrays to lists, NaN to ``null``, infinities to ``"inf"`` / ``"-inf"``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_benchmarks(targets: Sequence[str], methods: Sequence[str], preset: str, seed: int, out: Path | str, *,
                   log: Callable[[str], None] | None = _stderr, command: str | None = None) -> list[Path]:
    """
    Runs every method on every target and writes one JSON per (target, method) plus ``report.md``.

    :param targets: target names (:data:`benchmarks.targets.TARGETS`).
    :param methods: method names (:data:`benchmarks.methods.METHOD_NAMES`); run in that canonical order.
    :param str preset: harness preset (``smoke``, ``cpu``, ``gpu``).
    :param int seed: seed of every method's randomness.
    :param out: output folder (created).
    :param log: progress messages (default: stderr; ``None``: silent).
    :param str command: the command line, recorded in the JSON.
    :return: the written JSON paths.
    """
    log = log or (lambda msg: None)
    for name in targets:
        if name not in TARGETS:
            raise KeyError(f"unknown target {name!r}; choose from {list(TARGETS)}")
    for m in methods:
        if m not in METHOD_NAMES:
            raise KeyError(f"unknown method {m!r}; choose from {list(METHOD_NAMES)}")
    harness = get_preset(preset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    references = load_references()
    ordered = [m for m in METHOD_NAMES if m in methods]
    written = []
    for name in targets:
        target = get_target(name)
        nuts_draws, nuts_source = None, "nuts"
        saved = out / "draws" / f"{name}__nuts.npy"
        cache: dict[int | None, object] = {}  # references by the identity of the NUTS draws they use
        for method in ordered:
            if method != "nuts" and nuts_draws is None and saved.exists():
                nuts_draws = torch.from_numpy(np.load(saved))
                nuts_source = f"nuts (earlier run in this folder, draws/{saved.name})"
            # exact draws, when the target has them, are the reference: NUTS draws are not needed
            draws = None if method == "nuts" or target.sample is not None else nuts_draws
            key = None if draws is None else id(draws)
            if key not in cache:
                cache[key] = build_reference(target, harness, seed=seed, references=references, nuts_draws=draws,
                                             nuts_source=nuts_source)
            reference = cache[key]
            ctx = RunContext(target=target, preset=harness, seed=seed, reference=reference, out_dir=out, log=log)
            log(f"[{name}] {method} ({harness.name} preset, seed {seed})")
            env = environment_info()
            started = dt.datetime.now(dt.timezone.utc)
            result = run_method(method, ctx)
            flat = result.pop("flat_draws", None)
            if method == "nuts" and flat is not None:
                nuts_draws, nuts_source = flat, "nuts (same harness run)"
            try:
                env["machine"]["load_average_at_end"] = list(os.getloadavg())
            except OSError:
                pass
            record = {
                "schema_version": SCHEMA_VERSION,
                "target": name,
                "dim": target.dim,
                "method": method,
                "preset": harness.name,
                "seed": seed,
                "date": started.isoformat(timespec="seconds"),
                "command": command,
                **env,
                "harness_preset": harness.as_dict(),
                "reference": reference.summary(),
                **result,
            }
            path = out / f"{name}__{method}.json"
            path.write_text(json.dumps(to_jsonable(record), indent=1) + "\n")
            written.append(path)
            status = result["status"] if result["status"] == "ok" else f"ERROR {result.get('error')}"
            log(f"[{name}] {method}: {status}, {result['timings']['total_s']:.1f} s -> {path}")
            write_report(out)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=list(SMALL_TARGETS), metavar="TARGET",
                   help=f"targets (default: the small ones). Choices: {', '.join(TARGETS)}")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHOD_NAMES), metavar="METHOD",
                   help=f"methods (default: all). Choices: {', '.join(METHOD_NAMES)}")
    p.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<preset>)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--report-only", action="store_true", help="only regenerate <out>/report.md")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (``python -m benchmarks.run --help``); returns the exit status."""
    args = _parser().parse_args(argv)
    out = args.out if args.out is not None else REPO_ROOT / "benchmarks" / "results" / args.preset
    if args.report_only:
        print(write_report(out))
        return 0
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    run_benchmarks(args.targets, args.methods, args.preset, args.seed, out, log=None if args.quiet else _stderr,
                   command=command)
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
