# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
A fingerprint of the engine's outputs, for refactors that must not change the numbers.

Every engine path runs once with small, fixed settings and fixed seeds (each training method, each
preconditioner, one- and two-step flows, a mixture of flows, the marginal mixture, the runner on a Pyro model
and on a potential with chains in turn, in threads and in processes, enumerated discrete sites, save / load /
resume, two ``gloo`` ranks), and every output that is a number (network parameters, training histories without
their timings, draws, log-densities, weights, evidence, resampled draws, summaries) is hashed per case::

    python -m benchmarks.fingerprint --out before.json      # on the old code
    python -m benchmarks.fingerprint --out after.json       # on the new code
    python -m benchmarks.fingerprint --compare before.json after.json

``--compare`` lists the cases whose hashes differ (and the parts of each case that differ). One thread, about two
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings

import torch

D64 = torch.float64


# ------------------------------------------------------------------------------------------------
# hashing
def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        h.update(t.numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for o in obj:
            _feed(h, o)
        h.update(b"]")
    elif isinstance(obj, float):
        h.update(("nan" if math.isnan(obj) else repr(obj)).encode())
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# what a sampler, draws and a runner hold
def _history(trainer) -> dict:
    return {k: v for k, v in trainer.history.items() if k != "seconds"}


def _flows(sampler) -> list:
    return list(getattr(sampler, "components", [sampler]))


def sampler_parts(sampler) -> dict:
    parts = {}
    for i, flow in enumerate(_flows(sampler)):
        parts[f"flow{i}.net"] = [p for t in flow.trainers for p in list(t.net.parameters()) + list(t.ema.parameters())]
        parts[f"flow{i}.history"] = [_history(t) for t in flow.trainers]
        parts[f"flow{i}.stop"] = [t.stop_reason for t in flow.trainers]
        parts[f"flow{i}.preconditioner"] = flow.fit_preconditioner().state()
        parts[f"flow{i}.modes"] = [(c, m) for c, m in flow.modes]
    if hasattr(sampler, "weights"):
        parts["mixture.weights"] = sampler.weights
        parts["mixture.trained"] = list(sampler.trained)
    return parts


def draws_parts(draws, prefix="draws") -> dict:
    est = draws.evidence() if draws.log_det != "none" else None
    return {f"{prefix}.x": draws.x, f"{prefix}.potential": draws.potential, f"{prefix}.log_q": draws.log_q,
            f"{prefix}.log_weight": draws.log_weight, f"{prefix}.orientation": draws.orientation,
            f"{prefix}.component": draws.component, f"{prefix}.discrete": draws.discrete,
            f"{prefix}.evidence": None if est is None else tuple(est)}


def runner_parts(osds, *, predictive=False) -> dict:
    parts = {}
    for c, sampler in enumerate(osds.samplers):
        parts.update({f"chain{c}.{k}": v for k, v in sampler_parts(sampler).items()})
    for c, d in enumerate(osds.draws):
        parts.update(draws_parts(d, f"chain{c}.draws"))
    ev = osds.log_evidence()
    parts["evidence.pooled"] = tuple(ev.pooled)
    parts["evidence.chains"] = [tuple(c) for c in ev.chains]
    parts["evidence.components"] = [tuple(c) for c in ev.components]
    parts["evidence.flags"] = (ev.num_lost_modes, ev.too_many_modes, ev.reliable)
    # what the run spent, but its seconds: counts are deterministic, wall time is not
    parts["evidence.cost"] = [(c.potential_evaluations, c.network_passes) for c in ev.cost]
    parts["samples"] = osds.get_samples()
    parts["samples.grouped"] = osds.get_samples(group_by_chain=True)
    parts["samples.raw"] = osds.get_samples(resample=False)
    parts["summary"] = osds.summary_dict()
    parts["ess"] = osds.get_ESS()
    if predictive:
        torch.manual_seed(5)
        parts["predictive"] = osds.predictive()
    return parts


# ------------------------------------------------------------------------------------------------
# targets
def banana(x):
    return 0.5 * x[..., 0] ** 2 + 0.5 * (4 * (x[..., 1] - 0.3 * x[..., 0] ** 2)) ** 2 + 0.5 * (x[..., 2:] ** 2).sum(-1)


def three_modes(x):
    centres = torch.tensor([[-4.0, 0.0, 0.0], [4.0, 1.0, 0.0], [0.0, 6.0, -3.0]], dtype=x.dtype)
    log_w = torch.tensor([0.1, 0.3, 0.6], dtype=x.dtype).log()
    comp = torch.distributions.Normal(centres, 0.7).log_prob(x.unsqueeze(-2)).sum(-1)
    return -torch.logsumexp(comp + log_w, -1)


def two_well_product(x, weight=0.25, gap=7.0):
    a = math.log(weight) - 0.5 * (x + gap / 2) ** 2
    b = math.log1p(-weight) - 0.5 * (x - gap / 2) ** 2
    return -(torch.logaddexp(a, b) - 0.5 * math.log(2 * math.pi)).sum(-1)


def quartic(params):
    x = params["x"]
    return 0.5 * (((x - 1.0) / 0.7) ** 2).sum() + 0.1 * (x**4).sum()


def logistic_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g)
    y = (torch.rand(60, generator=g) < torch.sigmoid(X @ torch.tensor([1.0, -0.5, 0.3]))).float()
    return X, y


def logistic_model(X, y=None):
    import pyro
    import pyro.distributions as dist

    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=s * (X @ w)), obs=y)


def mixture_model(y):
    import pyro
    import pyro.distributions as dist

    locs = pyro.sample("locs", dist.Normal(torch.tensor([-1.0, 1.0]), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[k], 0.5), obs=y)


# ------------------------------------------------------------------------------------------------
# cases
def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def case_flow(method, precondition="gaussian", num_steps=1, **options):
    from pyro_osds.config import OSDSConfig
    from pyro_osds.samplers import FlowSampler

    config = OSDSConfig.for_method(method, OSDSConfig.preset("smoke"), precondition=precondition,
                                   early_stopping=False, num_iterations=8, num_steps=num_steps, **options)
    sampler = FlowSampler(banana, torch.zeros(3, dtype=D64), config, disable_progbar=True,
                          generator=torch.Generator().manual_seed(0))
    _quiet(sampler.fit)
    parts = sampler_parts(sampler)
    draws = sampler.draw(128, num_steps)
    parts.update(draws_parts(draws))
    if method != "cdds" or num_steps == 1:
        log_q, ok = sampler.log_q(draws.x[:16], num_steps)
        parts["log_q_inverse"] = (log_q, ok)
        parts["forward"] = tuple(_quiet(lambda: sampler.forward_evidence(torch.randn(
            64, 3, dtype=D64, generator=torch.Generator().manual_seed(1)), num_steps)))
    if method != "cdds":
        parts["em"] = tuple(sampler.em_evidence(64, num_steps))
    return parts


def case_early_stop():
    from pyro_osds.config import OSDSConfig
    from pyro_osds.samplers import FlowSampler

    sampler = FlowSampler(banana, torch.zeros(2, dtype=D64), OSDSConfig(num_iterations=120), disable_progbar=True,
                          generator=torch.Generator().manual_seed(0))
    _quiet(sampler.fit)
    return {**sampler_parts(sampler), **draws_parts(sampler.draw(256))}


def case_mixture():
    from pyro_osds.config import OSDSConfig
    from pyro_osds.samplers import build_sampler, restore_sampler

    config = OSDSConfig(num_iterations=10)
    sampler = build_sampler(three_modes, torch.zeros(3, dtype=D64), config, disable_progbar=True,
                            generator=torch.Generator().manual_seed(0))
    _quiet(sampler.fit)
    parts = sampler_parts(sampler)
    draws = sampler.draw(512)
    parts.update(draws_parts(draws))
    parts["log_q_inverse"] = sampler.log_q(draws.x[:16])
    restored = restore_sampler(three_modes, torch.zeros(3, dtype=D64), config, sampler.state_dict())
    parts.update(draws_parts(restored.draw(64), "restored"))
    parts["lost"] = list(sampler.check_modes(draws).lost)
    return parts


def case_marginal():
    from pyro_osds.config import OSDSConfig
    from pyro_osds.samplers import FlowSampler

    sampler = FlowSampler(two_well_product, torch.zeros(8, dtype=D64), OSDSConfig(num_iterations=15),
                          disable_progbar=True, generator=torch.Generator().manual_seed(0))
    _quiet(sampler.fit)
    parts = sampler_parts(sampler)
    draws = sampler.draw(512)
    parts.update(draws_parts(draws))
    parts["lost"] = list(sampler.check_modes(draws).lost)
    parts["too_many_modes"] = sampler.too_many_modes
    return parts


def _runner(seed=0, **options):
    import pyro

    from pyro_osds import OSDS

    pyro.set_rng_seed(seed)
    defaults = dict(num_samples=200, preset="smoke", early_stopping=False, disable_progbar=True)
    return OSDS(**{**defaults, **options})


def case_runner_model(**options):
    osds = _runner(model=logistic_model, **options)
    _quiet(lambda: osds.run(*logistic_data()))
    parts = runner_parts(osds, predictive=True)
    dt = _quiet(osds.to_datatree)
    parts["datatree.attrs"] = {k: v for k, v in dt.attrs.items() if k not in (
        "created_at", "pyro_osds_version", "inference_library_version", "sampling_time", "cost")}
    return parts


def case_runner_potential(**options):
    osds = _runner(potential_fn=quartic, initial_params={"x": torch.zeros(3, dtype=D64)}, **options)
    _quiet(osds.run)
    parts = runner_parts(osds)
    _quiet(lambda: osds.sample(150, 2))
    parts.update({f"again.{k}": v for k, v in runner_parts(osds).items()})
    return parts


def vindex_mixture_model(y):
    import pyro
    import pyro.distributions as dist
    from pyro.ops.indexing import Vindex

    locs = pyro.sample("locs", dist.Normal(torch.tensor([-1.0, 1.0]), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., k], 0.5), obs=y)


def case_runner_enumerated(model=mixture_model):
    y = torch.cat([torch.randn(20, generator=torch.Generator().manual_seed(0)) * 0.5 - 1.0,
                   torch.randn(30, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0])
    osds = _runner(model=model, mode_search_starts=0, max_plate_nesting=1)
    _quiet(lambda: osds.run(y))
    return runner_parts(osds)


def case_runner_mixture():
    from pyro_osds import OSDS

    def potential(params):
        return three_modes(params["x"])

    osds = _runner(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, preset=None,
                   num_iterations=10)
    _quiet(osds.run)
    parts = runner_parts(osds)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mix.pt")
        osds.save(path)
        loaded = OSDS.load(path, potential_fn=potential, disable_progbar=True)
        parts["loaded.evidence"] = tuple(loaded.log_evidence().pooled)
        torch.manual_seed(3)
        _quiet(loaded.sample)
        parts.update({f"loaded.{k}": v for k, v in runner_parts(loaded).items()})
    return parts


def case_checkpoint():
    from pyro_osds import OSDS

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")

        def hook(chain, step, info):
            if chain == 1 and step == 5:
                raise KeyboardInterrupt

        first = _runner(potential_fn=quartic, initial_params={"x": torch.zeros(3, dtype=D64)}, checkpoint=path,
                        checkpoint_every=2, hook_fn=hook)
        _quiet(lambda: first.fit())
        parts = {"interrupted.iterations": [s.iteration for s in first.samplers]}
        resumed = _runner(potential_fn=quartic, initial_params={"x": torch.zeros(3, dtype=D64)}, checkpoint=path,
                          resume=True)
        _quiet(resumed.run)
        parts.update({f"resumed.{k}": v for k, v in runner_parts(resumed).items()})
        loaded = OSDS.load(path, potential_fn=quartic, disable_progbar=True)
        _quiet(lambda: loaded.continue_training(12).sample())
        parts.update({f"continued.{k}": v for k, v in runner_parts(loaded).items()})
    return parts


def _distributed_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        def potential(params):
            return banana(params["x"])

        osds = _runner(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)},
                       batched_potential=True, preset=None, num_iterations=6, batch_size=64, dtype="float64")
        _quiet(osds.run)
        if rank == 0:
            torch.save({k: digest(v) for k, v in runner_parts(osds).items()}, out_file)
    finally:
        dist.destroy_process_group()


def case_distributed():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_distributed_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2,
                           start_method="spawn")
        return torch.load(out, weights_only=False)


CASES = {
    **{f"flow_{m}": (lambda m=m: case_flow(m)) for m in ("osds", "dis", "scds", "cdds")},
    **{f"flow_osds_{p}": (lambda p=p: case_flow("osds", p)) for p in ("laplace", "diagonal_laplace", "none")},
    "flow_osds_K2": lambda: case_flow("osds", num_steps=2),
    "flow_dis_K4": lambda: case_flow("dis", num_steps=4),
    "flow_cdds_K2": lambda: case_flow("cdds", num_steps=2),
    "flow_osds_paper": lambda: case_flow("osds", diffusion_weight=1.0, sd_weight=1.0, volume_weight=0.1,
                                         jacobian_weight=0.01, flow_kl_weight=0.5),
    "flow_osds_float64_net": lambda: case_flow("osds", dtype="float64"),
    "flow_early_stop": case_early_stop,
    "mixture": case_mixture,
    "marginal": case_marginal,
    "runner_model_in_turn": lambda: case_runner_model(chain_method="sequential"),
    "runner_model_threads": lambda: case_runner_model(chain_method="threads"),
    "runner_model_processes": lambda: case_runner_model(chain_method="processes"),
    "runner_potential": lambda: case_runner_potential(chain_method="sequential"),
    "runner_enumerated": case_runner_enumerated,
    # a model that batches in a particle plate: its potential and its discrete draws are vectorised
    "runner_enumerated_batched": lambda: case_runner_enumerated(vindex_mixture_model),
    "runner_mixture": case_runner_mixture,
    "checkpoint": case_checkpoint,
    "distributed": case_distributed,
}


def run(names=None) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name in names or CASES:
        start = time.perf_counter()
        parts = CASES[name]()
        out[name] = {"digest": digest(sorted(parts.items())),
                     "parts": {k: v if isinstance(v, str) else digest(v) for k, v in sorted(parts.items())}}
        print(f"{name}: {out[name]['digest']} ({time.perf_counter() - start:.1f} s)", flush=True)
    return out


def compare(a: dict, b: dict) -> int:
    differ = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'the first' if name in a else 'the second'}")
            continue
        pa, pb = a[name]["parts"], b[name]["parts"]
        bad = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
        if bad:
            differ += 1
            print(f"{name}: differs in {', '.join(bad)}")
    print("identical" if not differ else f"{differ} case(s) differ")
    return differ


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the fingerprint here (JSON)")
    parser.add_argument("--cases", nargs="*", help=f"a subset of {', '.join(CASES)}")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two fingerprints")
    args = parser.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as fa, open(args.compare[1]) as fb:
            return int(compare(json.load(fa), json.load(fb)) > 0)
    result = run(args.cases)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
