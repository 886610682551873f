# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The multimodal benchmark (issue #13): targets with known log Z and known mode weights, OSDS with its
defaults at several seeds, and the single-flow sampler of before (``components="single"``) as the
ablation row.

.. code-block:: bash

    OMP_NUM_THREADS=1 python -m benchmarks.multimodal --seeds 0 1 2 3 4 --out benchmarks/results/multimodal

For every (target, variant, seed) the sampler is built and trained on the target's float64 potential
(:func:`pyro_osds.samplers.build_sampler`: the mode search decides between one flow and a mixture with a
component per mode), then evaluated on ``--repeats`` independent sets of ``--draws`` fresh draws (any target
of :mod:`benchmarks.targets`; the Bayesian ones against ``benchmarks/references.json``):
log Z error, its standard error and z-score, ESS/N, k-hat, whether the estimate counts as reliable
(the runner's verdict, :attr:`~pyro_osds.results.LogEvidence.reliable`: the weights' diagnostics, no found
mode lost, a mode search that enumerated the modes), and the largest error of a mode's weight (the
self-normalised weight of the draws nearest to each true mode, against its exact mass). Writes
``<out>/multimodal.json`` (every record, machine, versions, commit) and ``<out>/multimodal.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.results import LogEvidence
from pyro_osds.samplers import MixtureSampler, build_sampler

from .methods import load_references
from .run import environment_info
from .scaling import commands_text, results_commands
from .targets import get_target

__all__ = ["DEFAULT_TARGETS", "VARIANTS", "main", "run_one"]

DEFAULT_TARGETS = (
    "gmm40_2d", "gmm9_2d",
    "two_modes_w30_s6_2d", "two_modes_w30_s10_2d", "two_modes_w10_s6_2d", "two_modes_w10_s10_2d",
    "two_modes_w30_s6_10d", "two_modes_w30_s10_10d", "two_modes_w10_s6_10d", "two_modes_w10_s10_10d",
    "mixture_model_k2", "mixture_model_k3", "many_well32",
)
#: the samplers compared: the defaults, and one flow over a covering Gaussian (the behaviour before #13)
VARIANTS = {"OSDS": {}, "single flow": {"components": "single"},
            "no marginal mixture": {"components": "single", "marginal_components": 0}}


def _mode_weight_error(target, x: torch.Tensor, log_w: torch.Tensor) -> float:
    if target.modes is None:
        return math.nan
    w = torch.softmax(log_w.to(torch.float64), 0)
    nearest = torch.cdist(x.to(torch.float64), target.modes).argmin(-1)
    shares = torch.zeros(len(target.modes), dtype=torch.float64).index_add_(0, nearest, w)
    return float((shares - target.mode_weights).abs().max())


def _true_log_z(target) -> float:
    """The exact log Z, or the reference value of ``benchmarks/references.json`` for the Bayesian targets."""
    if target.log_z is not None:
        return target.log_z
    return float(load_references()[target.name]["log_z"])


def run_one(name: str, variant: str, seed: int, *, draws: int, repeats: int) -> dict:
    """Trains and evaluates one sampler (module docstring); returns its record."""
    target = get_target(name)
    log_z = _true_log_z(target)
    config = OSDSConfig(**VARIANTS[variant])
    init = torch.zeros(target.dim, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        sampler = build_sampler(target.potential, init, config, generator=torch.Generator().manual_seed(seed),
                                disable_progbar=True)
        t1 = time.perf_counter()
        sampler.fit()
        t2 = time.perf_counter()
        records, xs, lws = [], [], []
        for _ in range(repeats):
            d = sampler.draw(draws, 1)
            xs.append(d.x)
            lws.append(d.log_weight)
            est = d.evidence()
            lost = len(sampler.check_modes(d).lost)
            verdict = LogEvidence.from_draws([d], 1, num_lost_modes=lost, too_many_modes=sampler.too_many_modes)
            records.append({
                "log_z": est.log_z, "se": est.se, "elbo": est.elbo, "ess_per_draw": est.ess_per_draw,
                "k_hat": est.k_hat, "reliable": verdict.reliable, "num_folded": est.num_folded,
                "lost_modes": lost, "too_many_modes": sampler.too_many_modes,
                "error": est.log_z - log_z, "z": (est.log_z - log_z) / est.se if est.se > 0 else math.nan,
                "mode_weight_error": _mode_weight_error(target, d.x, d.log_weight),
            })
    mixture = isinstance(sampler, MixtureSampler)
    return {
        "target": name, "dim": target.dim, "variant": variant, "seed": seed, "log_z_true": log_z,
        "search_s": t1 - t0, "train_s": t2 - t1,
        "components": len(sampler.components) if mixture else 1,
        "trained_components": sum(bool(t) for t in sampler.trained) if mixture else 1,
        "num_modes_found": sampler.report.num_modes if mixture
        else len(sampler.search.modes) if getattr(sampler, "search", None) is not None else None,
        "search_saturated": None if getattr(sampler, "search", None) is None else bool(sampler.search.saturated),
        "records": records,
        # the modes' weights from all repeats' draws together (their Monte Carlo error is smaller)
        "pooled_mode_weight_error": _mode_weight_error(target, torch.cat(xs), torch.cat(lws)),
        "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
    }


def _mean(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _markdown(results: list[dict], env: dict, command: str, title: str = "Multimodal benchmark") -> str:
    lines = [f"# {title}", "",
             f"{command} on {env['machine']['cpu_model']} ({env['machine']['cpu_count']} cores, "
             f"{env['machine']['torch_threads']} torch thread), torch {env['versions']['torch']}, "
             f"commit {env['versions'].get('git_commit')}. Each cell: mean over seeds of the mean over repeats; "
             "|Δ log Z| max is the worst seed's mean error; mode weights: the largest error of a mode's weight, "
             "from all repeats' draws of a seed together (worst seed); z: every repeat's (log Ẑ − truth) / SE; unflagged |z| > 3 counts estimates that are off by "
             "more than 3 SE and still call themselves reliable.", "",
             "| target | D | sampler | seeds | components (trained) | mean Δ log Z | max \\|Δ log Z\\| | max mode-weight "
             "error | ESS/N | k-hat | unflagged \\|z\\| > 3 | flagged | search + train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in results:
        if (r["target"], r["variant"]) not in keys:
            keys.append((r["target"], r["variant"]))
    for name, variant in keys:
        rs = [r for r in results if r["target"] == name and r["variant"] == variant]
        per_seed = [_mean([x["error"] for x in r["records"]]) for r in rs]
        recs = [x for r in rs for x in r["records"]]
        bad_z = sum(1 for x in recs if x["reliable"] and math.isfinite(x["z"]) and abs(x["z"]) > 3)
        flagged = sum(1 for x in recs if not x["reliable"])
        comps = f"{_mean([r['components'] for r in rs]):.1f} ({_mean([r['trained_components'] for r in rs]):.1f})"
        lines.append(
            f"| {name} | {rs[0]['dim']} | {variant} | {len(rs)} | {comps} | {_mean(per_seed):+.4f} | "
            f"{max(abs(e) for e in per_seed):.4f} | {max(r['pooled_mode_weight_error'] for r in rs):.4f} | "
            f"{_mean([x['ess_per_draw'] for x in recs]):.3f} | {_mean([x['k_hat'] for x in recs]):.2f} | "
            f"{bad_z}/{len(recs)} | {flagged}/{len(recs)} | {_mean([r['search_s'] + r['train_s'] for r in rs]):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/multimodal")
    parser.add_argument("--title", default="Multimodal benchmark")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "multimodal.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = previous.get("results", [])
    env = environment_info()
    command = "python -m benchmarks.multimodal " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else __import__("sys").argv[1:]))
    commands = results_commands(previous, command)
    for name in args.targets:
        for variant in args.variants:
            for seed in args.seeds:
                record = run_one(name, variant, seed, draws=args.draws, repeats=args.repeats)
                results = [r for r in results if (r["target"], r["variant"], r["seed"]) != (name, variant, seed)]
                results.append(record)
                errors = [x["error"] for x in record["records"]]
                print(f"[{name}] {variant} seed {seed}: dlogZ {_mean(errors):+.4f}, mode weights "
                      f"{record['pooled_mode_weight_error']:.4f}, components "
                      f"{record['components']} ({record['trained_components']} trained), "
                      f"{record['search_s'] + record['train_s']:.1f} s", flush=True)
                path.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                            "environment": env, "command": command, "commands": commands,
                                            "results": results}, indent=1))
    (out / "multimodal.md").write_text(_markdown(results, env, commands_text(commands), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
