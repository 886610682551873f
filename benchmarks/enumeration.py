# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Enumerated discrete sites against the same model marginalised by hand (issues #14 and #25).

Two models, each written twice, with its discrete sites enumerated (``infer={"enumerate": "parallel"}``, Pyro's
``Vindex``) and summed out by hand:

* a two-component Gaussian mixture (Dirichlet weights, two locations, one assignment per data point in a plate;
  by hand: ``MixtureSameFamily``);
* a hidden Markov model with two states (a Dirichlet row of transition probabilities per state, one location
  per state, unit Gaussian emissions), its states a ``pyro.markov`` chain of ``Categorical`` sites, one per time
  step, as Pyro's tutorials write it (by hand: the forward algorithm, a ``pyro.factor``).

Both versions are fitted with the defaults but a fixed training budget (early stopping off, so both train the same
number of iterations), two chains one after the other, one torch thread, in the same run; reported: seconds (and
where they went: the mode search, the preconditioner's fit, training, drawing), the ratio, and log Z (the two
versions have the same evidence).

    OMP_NUM_THREADS=1 python -m benchmarks.enumeration --sizes 12 200 --hmm-lengths 100
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


HMM_STATES = 2


def hmm_data(length: int, seed: int) -> torch.Tensor:
    """``length`` emissions of a sticky two-state chain (stay with probability 0.8) at locations -2 and 2."""
    g = torch.Generator().manual_seed(seed)
    stay = torch.tensor([[0.8, 0.2], [0.2, 0.8]], dtype=D64)
    states = [0]
    for _ in range(length - 1):
        states.append(int(torch.multinomial(stay[states[-1]], 1, generator=g)))
    return torch.tensor([-2.0, 2.0], dtype=D64)[states] + torch.randn(length, dtype=D64, generator=g)


def hmm_enumerated(y: torch.Tensor):
    trans = pyro.sample("trans", dist.Dirichlet(torch.ones(HMM_STATES, HMM_STATES, dtype=D64)).to_event(1))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(HMM_STATES, dtype=D64), 5.0).to_event(1))
    x = 0
    for t in pyro.markov(range(len(y))):
        x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(trans)[..., x, :]), infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], 1.0), obs=y[t])


def hmm_marginalised(y: torch.Tensor):
    trans = pyro.sample("trans", dist.Dirichlet(torch.ones(HMM_STATES, HMM_STATES, dtype=D64)).to_event(1))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(HMM_STATES, dtype=D64), 5.0).to_event(1))
    log_trans = trans.log()
    emission = dist.Normal(locs.unsqueeze(-2), 1.0).log_prob(y.unsqueeze(-1))  # (..., T, states)
    alpha = log_trans[..., 0, :] + emission[..., 0, :]  # the chain starts from state 0, as the enumerated one
    for t in range(1, len(y)):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_trans, -2) + emission[..., t, :]
    pyro.factor("forward", torch.logsumexp(alpha, -1))


def fit(model, y: torch.Tensor, args: argparse.Namespace) -> dict:
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    osds = OSDS(model, num_samples=args.num_samples, max_plate_nesting=1, disable_progbar=True, chain_method="sequential",
                early_stopping=False, num_iterations=args.num_iterations).run(y)
    seconds = time.perf_counter() - start
    ev = osds.log_evidence()
    return {"seconds": seconds, "vectorize": osds.target.vectorize, "log_z": ev.log_z, "se": ev.se,
            "ess_per_draw": ev.ess_per_draw, "k_hat": ev.k_hat, "iterations": [s.iteration for s in osds.samplers],
            "cost": ev.cost.as_dict()}


MODELS = {"mixture": (mixture_data, enumerated, marginalised), "hmm": (hmm_data, hmm_enumerated, hmm_marginalised)}


def _phases(fit: dict) -> str:
    cost = fit.get("cost")
    if cost is None:
        return "-"
    return " / ".join(f"{cost[f'{phase}_seconds']:.1f}" for phase in ("search", "preconditioner", "training", "drawing"))


def write_report(results: dict, out: Path) -> None:
    lines = [
        "# Enumerated discrete sites against the model marginalised by hand",
        "",
        f"{run_header(results)}; two chains one after the other, {results['settings']['num_iterations']} iterations each, {results['settings']['num_samples']} "
        "draws per chain, one torch thread. Mixture: data points; HMM: time steps (two states). Phases: the seconds of "
        "the mode search / the preconditioner's fit / training / drawing, summed over chains (`log_evidence().cost`); "
        "the rest of a run is its set-up and the enumerated sites' draws.",
        "",
        "| model | size | enumerated (s) | phases | marginalised (s) | phases | ratio | "
        "log Z enumerated | log Z marginalised | difference / SE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        e, m = row["enumerated"], row["marginalised"]
        diff = (e["log_z"] - m["log_z"]) / max((e["se"] ** 2 + m["se"] ** 2) ** 0.5, 1e-12)
        lines.append(f"| {row.get('model', 'mixture')} | {row['size']} | {e['seconds']:.1f} | {_phases(e)} | "
                     f"{m['seconds']:.1f} | {_phases(m)} | {e['seconds'] / m['seconds']:.2f} | "
                     f"{e['log_z']:.4f} +- {e['se']:.4f} | {m['log_z']:.4f} +- {m['se']:.4f} | {diff:+.1f} |")
    lines.append("")
    (out / "enumeration.md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--sizes", type=int, nargs="*", default=[12, 200], help="mixture data sizes")
    parser.add_argument("--hmm-lengths", type=int, nargs="*", default=[100], help="HMM lengths (time steps)")
    parser.add_argument("--num-iterations", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=2000)
    add_results_arguments(parser, OUT)
    args = parser.parse_args(argv)
    cases = [("mixture", size) for size in args.sizes] + [("hmm", length) for length in args.hmm_lengths]
    names = [("n" if model == "mixture" else "hmm") + str(size) for model, size in cases]
    started = start_results(args, "enumeration", names, write_report)
    if started is None:
        return 0
    path, results = started
    for (model, size), name in zip(cases, names, strict=True):
        data, with_enumeration, by_hand = MODELS[model]
        y = data(size, args.seed)
        row = {"name": name, "model": model, "size": size, "marginalised": fit(by_hand, y, args),
               "enumerated": fit(with_enumeration, y, args)}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        path.write_text(json.dumps(results, indent=1))
        write_report(results, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
