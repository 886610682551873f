# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Does the standard error mean what it says? The OSDS runner with its defaults (two chains) on Pyro models
with a known log Z, at many seeds, each evaluated on ``--repeats`` fresh sets of draws.

.. code-block:: bash

    OMP_NUM_THREADS=1 python -m benchmarks.calibration --seeds 0 1 2 3 4 5 6 7 8 9 --out benchmarks/results/calibration

For every repeat it records the pooled estimate's error, SE and z-score :math:`(\log\hat Z - \log Z)/\mathrm{SE}`
(the table divides by :math:`\sqrt{\mathrm{SE}^2 + \mathrm{SE}_{\rm ref}^2}` where the truth is a reference
estimate with its own standard error, ``benchmarks/references.json``),
the weights' diagnostics (ESS/N, k-hat, :attr:`~pyro_osds.results.LogEvidence.reliable`) and the agreement of
the two independently trained chains, :math:`z_{12} = (\log\hat Z_1 - \log\hat Z_2) / \sqrt{\mathrm{SE}_1^2 +
\mathrm{SE}_2^2}`, and the Markdown table says which diagnostics separate the estimates that are off by more
than 3 SE from the others. Writes ``<out>/calibration.json`` and ``<out>/calibration.md``.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import math
import shlex
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import pyro
import torch

from pyro_osds import OSDS

from .methods import load_references
from .multimodal import _true_log_z
from .run import environment_info
from .scaling import commands_text, results_commands
from .targets import get_target

__all__ = ["DEFAULT_TARGETS", "main", "parse_options", "run_one"]

DEFAULT_TARGETS = ("german_credit", "breast_cancer", "ionosphere", "sonar", "seeds", "brownian", "funnel10")


def run_one(name: str, seed: int, *, draws: int, repeats: int, options: dict | None = None) -> dict:
    """The runner on ``name``'s Pyro model at ``seed`` (module docstring), with the runner's ``options``;
    returns its record."""
    target = get_target(name)
    log_z = _true_log_z(target)
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        osds = OSDS(target.model, num_samples=draws, disable_progbar=True, **(options or {})).fit(*target.model_args)
        fit_s = time.perf_counter() - t0
        records = []
        for _ in range(repeats):
            ev = osds.sample().log_evidence()
            (a, b) = ev.chains[:2]
            records.append({
                "error": ev.log_z - log_z, "se": ev.se, "z": (ev.log_z - log_z) / ev.se if ev.se > 0 else math.nan,
                "ess_per_draw": ev.ess_per_draw, "k_hat": ev.k_hat, "reliable": ev.reliable,
                "chain_errors": [c.log_z - log_z for c in ev.chains], "chain_se": [c.se for c in ev.chains],
                "chain_k_hat": [c.k_hat for c in ev.chains],
                "chain_z": (a.log_z - b.log_z) / math.sqrt(a.se**2 + b.se**2) if a.se + b.se > 0 else math.nan,
            })
    return {"target": name, "dim": target.dim, "seed": seed, "options": options or {}, "log_z_true": log_z, "fit_s": fit_s,
            "records": records, "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})}


def parse_options(pairs: Sequence[str]) -> dict:
    """``["name=value", ...]`` as ``{name: value}``, each value a Python literal (``True``, ``400``, ``'single'``)."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--option takes NAME=VALUE, not {pair!r}")
        options[name.strip()] = ast.literal_eval(value.strip())
    return options


def _reference_se(name: str) -> float:
    """The standard error of the target's reference log Z (0 for an exact one)."""
    return 0.0 if get_target(name).log_z is not None else float(load_references()[name].get("se", 0.0))


def _with_reference_z(record: dict, reference_se: float) -> dict:
    """The repeat ``record`` with ``z`` divided by the error's whole standard error (estimate and reference)."""
    total = math.sqrt(record["se"] ** 2 + reference_se**2)
    return {**record, "z": record["error"] / total if total > 0 else math.nan}


def _rate(records: list[dict], flag) -> str:
    flagged = [r for r in records if flag(r)]
    off = [r for r in flagged if abs(r["z"]) > 3]
    return f"{len(off)}/{len(flagged)}"


def _markdown(results: list[dict], env: dict, command: str) -> str:
    lines = ["# Does the standard error mean what it says?", "",
             f"{command} on {env['machine']['cpu_model']} ({env['machine']['cpu_count']} cores), torch "
             f"{env['versions']['torch']}, commit {env['versions'].get('git_commit')}. The runner with its defaults "
             "(two chains) on each target's Pyro model; every repeat is a fresh `sample()` of the same trained "
             "chains. Off: |z| > 3, z = (log Ẑ − truth) / SE. The next columns give, among the repeats a "
             "diagnostic flags and among those it passes, how many are off (off/count): a diagnostic separates "
             "good from bad estimates when the off ones are flagged and the passed ones are not off.", "",
             "| target | D | runs | mean error | sd of z | off | k-hat > 0.7: off/flagged | k-hat ≤ 0.7: off/passed | "
             "k-hat > 0.5: off/flagged | k-hat ≤ 0.5: off/passed | "
             "chains disagree (\\|z12\\| > 3): off/flagged | chains agree: off/passed | `reliable` false: off/flagged "
             "| `reliable` true: off/passed | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = []
    for r in results:
        if r["target"] not in names:
            names.append(r["target"])
    for name in names:
        rs = [r for r in results if r["target"] == name]
        reference_se = _reference_se(name)
        recs = [_with_reference_z(x, reference_se) for r in rs for x in r["records"]]
        zs = [x["z"] for x in recs if math.isfinite(x["z"])]
        mean_z = sum(zs) / len(zs)
        sd_z = math.sqrt(sum((z - mean_z) ** 2 for z in zs) / max(len(zs) - 1, 1))
        off = sum(1 for z in zs if abs(z) > 3)
        lines.append(
            f"| {name} | {rs[0]['dim']} | {len(rs)} x {len(rs[0]['records'])} | "
            f"{sum(x['error'] for x in recs) / len(recs):+.4f} | {sd_z:.2f} | {off}/{len(recs)} | "
            f"{_rate(recs, lambda x: x['k_hat'] > 0.7)} | {_rate(recs, lambda x: not x['k_hat'] > 0.7)} | "
            f"{_rate(recs, lambda x: x['k_hat'] > 0.5)} | {_rate(recs, lambda x: not x['k_hat'] > 0.5)} | "
            f"{_rate(recs, lambda x: abs(x['chain_z']) > 3)} | {_rate(recs, lambda x: not abs(x['chain_z']) > 3)} | "
            f"{_rate(recs, lambda x: not x['reliable'])} | {_rate(recs, lambda x: x['reliable'])} | "
            f"{sum(r['fit_s'] for r in rs) / len(rs):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an OSDS option for every run (a Python literal), e.g. precondition_tails=True")
    parser.add_argument("--out", default="benchmarks/results/calibration")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the table from the JSON and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "calibration.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = previous.get("results", [])
    env = environment_info()
    command = "python -m benchmarks.calibration " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else __import__("sys").argv[1:]))
    if args.markdown_only:
        saved = previous.get("commands", [previous["command"]])
        (out / "calibration.md").write_text(_markdown(results, previous["environment"], commands_text(saved)))
        return 0
    commands = results_commands(previous, command)
    for name in args.targets:
        for seed in args.seeds:
            record = run_one(name, seed, draws=args.draws, repeats=args.repeats, options=parse_options(args.option))
            results = [r for r in results if (r["target"], r["seed"]) != (name, seed)]
            results.append(record)
            zs = [x["z"] for x in record["records"]]
            print(f"[{name}] seed {seed}: z {[round(z, 1) for z in zs]}, chains z12 "
                  f"{[round(x['chain_z'], 1) for x in record['records']]}, k-hat "
                  f"{[round(x['k_hat'], 2) for x in record['records']]}, {record['fit_s']:.1f} s", flush=True)
            path.write_text(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                        "environment": env, "command": command, "commands": commands,
                                        "results": results}, indent=1))
    (out / "calibration.md").write_text(_markdown(results, env, commands_text(commands)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
