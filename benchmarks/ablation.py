# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Ablation of the one-step quality choices (issue #7): each row changes the default configuration in
one respect (or restores the paper's objective) and reports, per target, the one-step (:math:`K = 1`)
deterministic-flow ESS/N, the log Z error against the reference, the ELBO gap, Pareto k-hat, folded
draws and the training time, next to importance sampling from the Laplace Gaussian; and the ESS/N and
folded draws of the same network's four-step map (:math:`K = 4`). The table is rewritten after every
row, so an interrupted run keeps what it measured.

``python -m benchmarks.ablation --targets ionosphere sonar funnel10 --out benchmarks/results/ablation.md``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pyro_osds import __version__
from pyro_osds.config import OSDSConfig
from pyro_osds.ops.estimators import evidence
from pyro_osds.ops.precondition import fit_laplace
from pyro_osds.samplers import FlowSampler

from .methods import laplace_importance_draws, load_references
from .targets import get_target

D64 = torch.float64

#: name -> (preset, changes): the defaults, one change at a time, and the paper's objective
VARIANTS: dict[str, tuple[str, dict]] = {
    "default (one-step objective)": ("cpu", {}),
    "total gradient (no path estimator)": ("cpu", {"flow_kl_gradient": "total"}),
    "path gradient for every draw (no fallback)": ("cpu", {"path_gradient_cutoff": None}),
    "previous defaults (total gradient, 1000 its, lr 3e-3)": (
        "cpu", {"flow_kl_gradient": "total", "num_iterations": 1000, "learning_rate": 3e-3}),
    "1000 iterations at lr 3e-3": ("cpu", {"num_iterations": 1000, "learning_rate": 3e-3}),
    "no fold penalty": ("cpu", {"fold_weight": 0.0}),
    "trained at K = 1 and 4": ("cpu", {"flow_kl_steps": (1, 4)}),
    "paper objective, same budget": ("paper-cpu", {}),
    "paper objective + flow KL": ("paper-cpu", {"flow_kl_weight": 1.0}),
    "grad clip 1 (paper)": ("cpu", {"grad_clip": 1.0}),
    "lr 1e-3 constant (paper)": ("cpu", {"learning_rate": 1e-3, "lr_schedule": "constant"}),
    "sample with the EMA network": ("cpu", {"sample_with_ema": True}),
    "flow-KL batch 64": ("cpu", {"flow_kl_batch_size": 64}),
    "500 iterations": ("cpu", {"num_iterations": 500}),
    "hidden width 32": ("cpu", {"hidden_dim": 32}),
    "GELU (paper)": ("cpu", {"activation": "gelu"}),
    "float64 flow": ("cpu", {"dtype": "float64"}),
    "Langevin input at the step's end": ("cpu", {"langevin_time": "end"}),
    "no preconditioning": ("cpu", {"precondition": "none"}),
    "Laplace preconditioning": ("cpu", {"precondition": "laplace"}),
}


def reference_log_z(name: str) -> float:
    target = get_target(name)
    if target.log_z is not None:
        return target.log_z
    return load_references()[name]["log_z"]


def laplace_is(target, num_draws: int, seed: int) -> dict:
    t0 = time.perf_counter()
    affine, _ = fit_laplace(target.potential, torch.zeros(target.dim, dtype=D64))
    _, log_w = laplace_importance_draws(target.potential, affine, num_draws, seed)
    return {"estimate": evidence(log_w), "seconds": time.perf_counter() - t0}


def run_variant(target, preset: str, changes: dict, num_draws: int, seed: int) -> dict:
    config = OSDSConfig.preset(preset, **changes)
    sampler = FlowSampler(target.potential, torch.zeros(target.dim, dtype=D64), config, disable_progbar=True,
                          generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    try:
        sampler.fit()
    except Exception as err:  # noqa: BLE001 - a failed variant is a result too
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.perf_counter() - t0}
    train_s = time.perf_counter() - t0
    return {"estimate": sampler.evidence(num_draws, 1), "estimate_4": sampler.evidence(num_draws, 4),
            "seconds": train_s}


def row(label: str, result: dict, log_z: float) -> str:
    if "error" in result:
        return f"| {label} | failed: {result['error'][:60]} | | | | | {result['seconds']:.0f} | | |"
    e = result["estimate"]
    e4 = result.get("estimate_4")
    k4 = f"{e4.ess_per_draw:.3f} | {e4.num_folded}" if e4 is not None else "— | —"
    return (f"| {label} | {e.ess_per_draw:.3f} | {e.log_z - log_z:+.3f} ± {e.se:.3f} | {e.elbo - log_z:+.3f} | "
            f"{e.k_hat:.2f} | {e.num_folded} | {result['seconds']:.0f} | {k4} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["ionosphere", "sonar", "funnel10"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--draws", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ablation.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# One-step (K = 1) ablation", "",
             f"pyro_osds {__version__}, torch {torch.__version__}, one thread, seed {args.seed}, "
             f"{args.draws} fresh draws per estimate; training seconds on a shared 2-core machine.", ""]
    for name in args.targets:
        target = get_target(name)
        log_z = reference_log_z(name)
        lines += [f"## {name} (D = {target.dim}, reference log Z = {log_z:.4f})", "",
                  "| variant | ESS/N | log Z error ± SE | ELBO − log Z | k-hat | folded | train s | K=4 ESS/N | K=4 folded |",
                  "|---|---|---|---|---|---|---|---|---|"]
        try:
            lap = laplace_is(target, args.draws, args.seed)
        except Exception as err:  # noqa: BLE001
            lap = {"error": f"{type(err).__name__}: {err}", "seconds": 0.0}
        lines.append(row("Laplace importance sampling (baseline)", lap, log_z))
        print(lines[-1], flush=True)
        for label in args.variants:
            preset, changes = VARIANTS[label]
            lines.append(row(label, run_variant(target, preset, changes, args.draws, args.seed), log_z))
            print(f"{name}: {lines[-1]}", flush=True)
            write(args.out, lines)
        lines.append("")
    write(args.out, lines)
    print(f"wrote {args.out}")


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
