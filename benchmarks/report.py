# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Markdown report of a folder of harness results (one JSON per target and method, as written by
:mod:`benchmarks.run`). The report is regenerated from all JSON files in the folder, so runs can be
added one at a time.

Layout: a headline table (:math:`|\Delta\log Z|` and effective samples per second of OSDS at
:math:`K = 1` against NUTS and DIS at :math:`K = T`), the references, then one table per metric
(rows: targets; columns: method :math:`\times` step budget :math:`K`), first for the exact
deterministic-flow weights together with the baselines, then for the Euler--Hutchinson and the EM
weights, then timings, NUTS diagnostics, failures and warnings, and the definitions.

``python -m benchmarks.report DIR`` rewrites ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_report", "load_runs", "main", "write_report"]

REPORT_NAME = "report.md"
_METHOD_ORDER = {"osds": 0, "osds_paper": 1, "scds": 2, "cdds": 3, "dis": 4, "nuts": 5, "svi_is": 6, "laplace_is": 7}
_TARGET_ORDER = ("funnel10", "gmm9_2d", "gmm40_50d", "student_t_mixture_50d", "many_well32", "ionosphere", "sonar",
                 "german_credit", "breast_cancer", "seeds", "brownian")


# ---------------------------------------------------------------------------------------------------
# Loading


def _num(value) -> float:
    """A JSON number back to float (``None`` -> NaN; the strings ``"inf"`` / ``"-inf"`` -> infinities)."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return math.nan
    return float(value)


def load_runs(folder: Path | str) -> list[dict]:
    """All harness result files (``*.json`` with a ``target`` and a ``method``) in ``folder``, sorted."""
    runs = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "target" in data and "method" in data:
            data["_file"] = path.name
            runs.append(data)
    order = {name: i for i, name in enumerate(_TARGET_ORDER)}
    runs.sort(key=lambda r: (order.get(r["target"], 99), r["target"], _METHOD_ORDER.get(r["method"], 9)))
    return runs


# ---------------------------------------------------------------------------------------------------
# Formatting


def _fmt(value, spec: str = ".3g") -> str:
    x = _num(value)
    if math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _fmt_ms(ms: dict | None, spec: str = ".3g") -> str:
    """``mean ± sd`` of a ``{"mean", "sd", "n"}`` dict (just the mean for one value)."""
    if not ms or not ms.get("n"):
        return "—"
    mean, sd = _num(ms.get("mean")), _num(ms.get("sd"))
    if math.isfinite(sd):
        return f"{_fmt(mean, spec)} ± {_fmt(sd, '.2g')}"
    return _fmt(mean, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Entries


def _entries(runs: list[dict]) -> dict[str, list[dict]]:
    """Evaluation entries per target, each with its run's method attached."""
    out: dict[str, list[dict]] = {}
    for run in runs:
        for e in run.get("evaluations", []):
            e = dict(e)
            e["_run"] = run
            out.setdefault(run["target"], []).append(e)
    return out


def _column_key(e: dict) -> tuple:
    K = e.get("K")
    return (_METHOD_ORDER.get(e["method"], 9), K if K is not None else 0, e["label"])


def _nuts_ess_per_s(entries: list[dict]) -> float:
    for e in entries:
        if e["method"] == "nuts":
            return _num((e.get("ess_per_s") or {}).get("mean"))
    return math.nan


def _ratio_ms(e: dict, nuts: float) -> dict:
    ms = e.get("ess_per_s") or {}
    mean = _num(ms.get("mean"))
    if not (nuts > 0) or not math.isfinite(mean):
        return {"n": 0}
    return {"mean": mean / nuts, "sd": _num(ms.get("sd")) / nuts, "n": ms.get("n", 1)}


#: Metric tables: (title, getter of a mean/sd dict or a string, format, weight kinds it applies to).
_Getter = Callable[[dict, list[dict]], object]


def _metric(key: str) -> _Getter:
    return lambda e, entries: e.get(key)


def _moment(key: str) -> _Getter:
    return lambda e, entries: (e.get("moments") or {}).get(key)


def _distance(key: str) -> _Getter:
    def get(e, entries):
        d = e.get(key)
        return None if not d else {"mean": d.get("value"), "sd": None, "n": 1}
    return get


def _invalid(e: dict, entries: list[dict]):
    flag = e.get("elbo_invalid")
    return "—" if flag is None else ("**yes**" if flag else "no")


def _nfe(e: dict, entries: list[dict]):
    return None if e.get("nfe") is None else {"mean": e["nfe"], "sd": None, "n": 1}


def _ratio(e: dict, entries: list[dict]):
    if e["method"] == "nuts":
        return None
    return _ratio_ms(e, _nuts_ess_per_s(entries))


_EVIDENCE_TABLES = [
    ("log Z (mean ± sd over repeats)", _metric("log_z"), ".2f"),
    ("|Δ log Z| against the reference", _metric("abs_delta_log_z"), ".3g"),
    ("ELBO (mean log-weight)", _metric("elbo"), ".2f"),
    ("ELBO > log Z_ref + 3 SE (an invalid lower bound)", _invalid, ""),
    ("Kish ESS / N", _metric("ess_per_draw"), ".3g"),
    ("PSIS k-hat", _metric("k_hat"), ".2f"),
]
_DF_TABLES = _EVIDENCE_TABLES + [
    ("Folded draws (Jacobian orientation differs from the majority), per N draws", _metric("num_folded"), ".3g"),
    ("Posterior mean error, max over coordinates (reference posterior sd units)", _moment("mean_error_max"), ".3g"),
    ("Posterior mean error, median over coordinates", _moment("mean_error_median"), ".3g"),
    ("Posterior sd error, max over coordinates (relative)", _moment("sd_error_max"), ".3g"),
    ("Posterior sd error, median over coordinates", _moment("sd_error_median"), ".3g"),
    ("Sinkhorn divergence to the reference draws (unweighted draws)", _distance("sinkhorn"), ".3g"),
    ("MMD (sqrt, Gaussian kernel, median bandwidth) to the reference draws", _distance("mmd"), ".3g"),
    ("NFE per draw (network calls; NUTS: model evaluations per kept draw, warm-up included)", _nfe, ".4g"),
    ("Effective samples per second after training (Kish ESS of N draws / seconds to draw and weight them; "
     "NUTS: bulk-ESS min / wall clock)", _metric("ess_per_s"), ".3g"),
    ("ESS/s ratio against NUTS (bulk-ESS min per second, same folder)", _ratio, ".3g"),
]


def _metric_table(targets: list[str], per_target: dict[str, list[dict]], kinds: set[str], getter: _Getter,
                  spec: str) -> str | None:
    columns: dict[str, tuple] = {}
    cells: dict[tuple[str, str], str] = {}
    for t in targets:
        entries = per_target.get(t, [])
        for e in entries:
            if e.get("weights") not in kinds:
                continue
            value = getter(e, entries)
            text = value if isinstance(value, str) else _fmt_ms(value, spec)
            if value is None or text == "—":
                continue
            columns.setdefault(e["label"], _column_key(e))
            cells[(t, e["label"])] = text
    if not columns:
        return None
    labels = sorted(columns, key=lambda c: columns[c])
    rows = [[t] + [cells.get((t, c), "") for c in labels] for t in targets if any((t, c) in cells for c in labels)]
    return _table(["target"] + labels, rows)


# ---------------------------------------------------------------------------------------------------
# Sections


def _first(entries: list[dict], method: str, K=None, weights: str | None = None, largest_K: bool = False):
    cands = [e for e in entries if e["method"] == method and (weights is None or e.get("weights") == weights)]
    if K is not None:
        cands = [e for e in cands if e.get("K") == K]
    if largest_K and cands:
        top = max(e.get("K") or 0 for e in cands)
        cands = [e for e in cands if (e.get("K") or 0) == top]
    return cands[0] if cands else None


def _headline(targets: list[str], per_target: dict[str, list[dict]], runs: list[dict]) -> str:
    header = ["target", "D", "log Z ref", "OSDS K=1 |Δ|", "DIS K=T |Δ| (DF)", "DIS K=T |Δ| (EM)", "SVI+IS |Δ|",
              "Laplace IS |Δ|", "OSDS K=1 ESS/s", "DIS K=T ESS/s (DF)", "NUTS ESS/s", "OSDS K=1 / NUTS"]
    rows = []
    for t in targets:
        entries = per_target.get(t, [])
        run = next((r for r in runs if r["target"] == t), {})
        ref = run.get("reference") or {}
        osds = _first(entries, "osds", K=1, weights="exact")
        dis_df = _first(entries, "dis", weights="exact", largest_K=True)
        dis_em = _first(entries, "dis", weights="em", largest_K=True)
        svi = _first(entries, "svi_is")
        lap = _first(entries, "laplace_is")
        nuts = _nuts_ess_per_s(entries)

        def delta(e):
            return "—" if e is None else _fmt_ms(e.get("abs_delta_log_z"), ".3g")

        def eps(e):
            return "—" if e is None else _fmt_ms(e.get("ess_per_s"), ".3g")

        k_label = "" if dis_df is None else f" (T={dis_df.get('K')})"
        rows.append([
            t, str(run.get("dim", "")), _fmt(ref.get("log_z"), ".3f"), delta(osds), delta(dis_df) + k_label,
            delta(dis_em), delta(svi), delta(lap), eps(osds), eps(dis_df), _fmt(nuts, ".3g"),
            "—" if osds is None else _fmt_ms(_ratio_ms(osds, nuts), ".3g"),
        ])
    return _table(header, rows)


def _references(targets: list[str], runs: list[dict]) -> str:
    rows = []
    for t in targets:
        run = next((r for r in runs if r["target"] == t and r.get("reference")), None)
        if run is None:
            continue
        ref = run["reference"]
        floor = ref.get("floor") or {}
        se = _num(ref.get("log_z_se"))
        rows.append([t, str(run.get("dim", "")),
                     _fmt(ref.get("log_z"), ".4f") + ("" if not se > 0 else f" ± {_fmt(se, '.2g')}"),
                     str(ref.get("log_z_source", "")), str(ref.get("moments_source", "")),
                     f"{ref.get('draws_source', '')} ({ref.get('num_draws') or 0})",
                     _fmt(floor.get("sinkhorn")), _fmt(floor.get("mmd"))])
    return _table(["target", "D", "log Z ref", "log Z source", "moments", "draws for Sinkhorn / MMD",
                   "Sinkhorn floor", "MMD floor"], rows)


def _timing_tables(targets: list[str], runs: list[dict]) -> list[str]:
    specs = [
        ("Training / fitting wall clock (s; NUTS: warm-up + sampling)", "train_s", None),
        ("Preconditioner / setup (s)", "setup_s", None),
        ("Draws without weights: seconds per 10^4 draws (measured on the number in brackets)", "draw_small_s",
         "draw_small_n"),
        ("Draws with exact weights: seconds per 10^4 draws", "draw_small_weighted_s", "draw_small_n"),
        ("Draws without weights: seconds per 10^6 draws (chunked)", "draw_large_s", "draw_large_n"),
    ]
    out = []
    for title, key, n_key in specs:
        columns, cells = {}, {}
        for run in runs:
            timings = run.get("timings") or {}
            if timings.get(key) is None:
                continue
            label = {"osds": "OSDS", "osds_paper": "OSDS (paper obj.)", "scds": "SCDS", "cdds": "CDDS", "dis": "DIS",
                     "nuts": "NUTS", "svi_is": "SVI+IS", "laplace_is": "Laplace IS"}.get(run["method"], run["method"])
            if timings.get("K") is not None and key.startswith("draw"):
                label += f" K={timings['K']}"
            value = _num(timings[key])
            text = _fmt(value)
            if n_key is not None and timings.get(n_key):
                n = int(timings[n_key])
                per = 1e4 if key != "draw_large_s" else 1e6
                text = f"{_fmt(value * per / n)} ({n})"
            columns.setdefault(label, (_METHOD_ORDER.get(run["method"], 9), label))
            cells[(run["target"], label)] = text
        if not columns:
            continue
        labels = sorted(columns, key=lambda c: columns[c])
        rows = [[t] + [cells.get((t, c), "") for c in labels] for t in targets if any((t, c) in cells for c in labels)]
        out.append(f"### {title}\n\n" + _table(["target"] + labels, rows))
    return out


def _nuts_table(targets: list[str], per_target: dict[str, list[dict]], runs: list[dict]) -> str | None:
    rows = []
    for t in targets:
        e = _first(per_target.get(t, []), "nuts")
        if e is None:
            continue
        ess = e.get("ess") or {}
        wall = _num((e["_run"].get("timings") or {}).get("wall_s"))
        rows.append([t, _fmt(wall), _fmt(ess.get("bulk_min"), ".4g"), _fmt(ess.get("bulk_median"), ".4g"),
                     _fmt(ess.get("tail_min"), ".4g"), _fmt_ms(e.get("ess_per_s")), _fmt(e.get("ess_bulk_median_per_s")),
                     str(e.get("divergences", "")), _fmt(e.get("mean_accept_prob"), ".2f"), _fmt(e.get("step_size")),
                     _fmt(e.get("nfe"), ".4g")])
    if not rows:
        return None
    return _table(["target", "wall (s)", "ESS bulk min", "ESS bulk median", "ESS tail min", "bulk-min ESS/s",
                   "bulk-median ESS/s", "divergences", "mean accept prob", "step size", "model evals / draw"], rows)


def _problems(runs: list[dict]) -> str:
    lines = []
    for run in runs:
        name = f"{run['target']} / {run['method']}"
        if run.get("status") != "ok":
            lines.append(f"* **{name} failed**: {run.get('error', '?')}")
        for e in run.get("evaluations", []):
            for err in e.get("errors") or []:
                lines.append(f"* {name} {e['label']}: {err}")
        for w in run.get("warnings") or []:
            msg = " ".join(str(w.get("message", "")).split())
            if len(msg) > 240:
                msg = msg[:237] + "..."
            lines.append(f"* {name}: {w.get('category')} (x{w.get('count')}): {msg}")
    return "\n".join(lines) if lines else "None."


def _provenance(runs: list[dict]) -> str:
    def distinct(get):
        seen = []
        for r in runs:
            v = get(r)
            if v not in seen:
                seen.append(v)
        return seen

    machines = distinct(lambda r: (r.get("machine") or {}).get("cpu_model"))
    threads = distinct(lambda r: (r.get("machine") or {}).get("torch_threads"))
    cores = distinct(lambda r: (r.get("machine") or {}).get("cpu_count"))
    commits = distinct(lambda r: (r.get("versions") or {}).get("git_commit"))
    versions = distinct(lambda r: tuple((r.get("versions") or {}).get(k) for k in ("torch", "pyro", "pyro_osds")))
    presets = distinct(lambda r: r.get("preset"))
    seeds = distinct(lambda r: r.get("seed"))
    dates = sorted(str(r.get("date", "")) for r in runs)
    lines = [
        f"* presets: {', '.join(map(str, presets))}; seeds: {', '.join(map(str, seeds))}; "
        f"runs dated {dates[0]} to {dates[-1]}" if dates else "* no runs",
        f"* machine: {'; '.join(map(str, machines))} ({', '.join(map(str, cores))} cores, torch threads "
        f"{', '.join(map(str, threads))})",
        f"* versions (torch, pyro, pyro_osds): {'; '.join(', '.join(map(str, v)) for v in versions)}",
        f"* git commit(s): {', '.join(map(str, commits))}",
    ]
    if len(commits) > 1 or len(machines) > 1 or len(presets) > 1:
        lines.append("* **warning**: the runs in this folder differ in commit, machine or preset; compare with care.")
    return "\n".join(lines)


_NOTES = """\
* **Weights.** *DF* = deterministic-flow draws weighted with the exact log-determinant of the discrete
  K-step map (`log_det="exact"`); *EH* = the same draws weighted with the OSDS authors' Euler-Hutchinson
  volume (`log_det="hutchinson"`), which is not the density of the map actually applied; *EM* =
  stochastic Euler-Maruyama paths weighted by the path likelihood ratio (`em_evidence`). Each OSDS / DIS
  cell is the mean ± sd over R independent evaluations of N fresh draws (see each JSON's preset).
* **log Z, ELBO, ESS, k-hat** from `pyro_osds.estimators.evidence`: log Z = log mean w, ELBO = mean log w,
  Kish ESS = (Σw)²/Σw², PSIS Pareto k-hat (> 0.7: unreliable).
* **|Δ log Z|** against the exact log Z (synthetic targets) or `benchmarks/references.json`.
* **Invalid ELBO**: the mean ELBO exceeds log Z_ref + 3 SE, SE = sqrt(SE_ELBO² + SE_ref²) with SE_ELBO the
  pooled Monte-Carlo standard error of the mean ELBO over all R·N draws. A correct ELBO cannot do that.
* **Moment errors**: |mean − mean_ref| / sd_ref and |sd − sd_ref| / sd_ref per coordinate (flat unconstrained
  coordinates), self-normalised importance weights for the IS methods and OSDS/DIS, plain averages for NUTS;
  reference: references.json moments, else exact draws, else the NUTS run in this folder.
* **Sinkhorn / MMD** on unweighted draws (as in the OSDS evaluation; for the IS baselines that is the
  proposal), first repeat, against exact draws or the NUTS draws of this folder. Sinkhorn: debiased entropic
  OT with squared Euclidean cost, ε = 0.05 × the mean squared distance between reference draws (see the
  Sinkhorn floor: two independent exact samples). Funnel draws are clipped to [−30, 30] as in the OSDS code.
  MMD: biased V-statistic, Gaussian kernel with the median pairwise distance as bandwidth, square root.
* **ESS/s** after training: Kish ESS of the N weighted draws / the seconds to draw and weight them;
  NUTS: arviz bulk-ESS minimum over coordinates / total wall clock including warm-up. Timings come from a
  shared 2-core machine and are ±10 % at best; compare only runs made back to back.
"""


def build_report(runs: list[dict], title: str | None = None) -> str:
    """The Markdown report of ``runs`` (as returned by :func:`load_runs`)."""
    targets = []
    for r in runs:
        if r["target"] not in targets:
            targets.append(r["target"])
    per_target = _entries(runs)
    presets = sorted({str(r.get("preset")) for r in runs})
    parts = [f"# {title or 'OSDS benchmark report'} (preset: {', '.join(presets) or '—'})",
             "Generated from the JSON files in this folder by `benchmarks/report.py`; rows are targets, "
             "columns are method × step budget K.", _provenance(runs)]
    parts += ["## Headline: |Δ log Z| and effective samples per second", _headline(targets, per_target, runs)]
    parts += ["## References", _references(targets, runs)]
    groups = [
        ("Exact deterministic-flow weights (OSDS, DIS) and baselines", {"exact", "is", "mcmc"}, _DF_TABLES),
        ("Euler-Hutchinson deterministic-flow weights (the OSDS authors' estimator)", {"hutchinson"},
         _EVIDENCE_TABLES),
        ("EM path weights", {"em"}, _EVIDENCE_TABLES),
    ]
    for heading, kinds, tables in groups:
        parts.append(f"## {heading}")
        for name, getter, spec in tables:
            table = _metric_table(targets, per_target, kinds, getter, spec)
            if table is not None:
                parts.append(f"### {name}\n\n{table}")
    parts.append("## Timings")
    parts += _timing_tables(targets, runs)
    nuts = _nuts_table(targets, per_target, runs)
    if nuts is not None:
        parts += ["## NUTS diagnostics", nuts]
    parts += ["## Failures and warnings", _problems(runs), "## Definitions", _NOTES]
    return "\n\n".join(parts) + "\n"


def write_report(folder: Path | str) -> Path:
    """Regenerates ``folder/report.md`` from all result JSON files in ``folder``; returns its path."""
    folder = Path(folder)
    path = folder / REPORT_NAME
    path.write_text(build_report(load_runs(folder)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the Markdown report of a results folder.")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    print(write_report(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
