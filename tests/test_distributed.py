# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.distributed: two processes on the gloo backend (spawned here) train the same sampler as one
process on the whole batch, merge their draws exactly, fail clearly when a rank dies, and resume."""

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_osds import OSDS
from pyro_osds.distributed import DistributedError, all_gather_rows, shard
from tests.common import D64, mixture_potential

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

# a float64 network, so that "the same training" is checked to 1e-9 (float32 sums in another order drift by 1e-7)
OPTIONS = dict(num_samples=301, num_chains=2, num_iterations=12, batch_size=64, early_stopping=False,
               disable_progbar=True, dtype="float64")


def banana(params):
    x = params["x"]
    return 0.5 * x[..., 0] ** 2 + 0.5 * (4 * (x[..., 1] - 0.3 * x[..., 0] ** 2)) ** 2 + 0.5 * (x[..., 2:] ** 2).sum(-1)


def two_modes(params):
    return mixture_potential(params["x"])


POTENTIALS = {"banana": (banana, 4), "two_modes": (two_modes, 2)}


def fit(name, **options):
    potential, dim = POTENTIALS[name]
    torch.manual_seed(0)
    return OSDS(potential_fn=potential, initial_params={"x": torch.zeros(dim, dtype=D64)}, batched_potential=True,
                **{**OPTIONS, **options}).run()


def result(osds):
    ev = osds.log_evidence()
    return {"params": [[p.detach().clone() for p in s.sampling_net.parameters()] for s in _flows(osds)],
            "x": [d.x for d in osds.draws], "log_weight": [d.log_weight for d in osds.draws],
            "log_z": ev.log_z, "se": ev.se, "ess": ev.ess, "k_hat": ev.k_hat,
            "chain_log_z": [c.log_z for c in ev.chains], "iterations": [s.iteration for s in osds.samplers]}


def _flows(osds):
    return [c for s in osds.samplers for c in getattr(s, "components", [s])]


def worker(rank, world_size, init_file, out_dir, name, options, die_at):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        if die_at is not None:
            def hook(chain, step, info):
                if rank == 1 and step == die_at:
                    os._exit(3)  # a killed rank: no clean-up, no goodbye
            options = {**options, "hook_fn": hook}
        try:
            osds = fit(name, **options)
        except DistributedError as err:
            torch.save({"error": str(err)}, os.path.join(out_dir, f"rank{rank}.pt"))
            return
        ctx = osds.distributed
        mine = shard(OPTIONS["num_samples"], ctx)
        # the gather itself: the union of the ranks' own rows, in rank order
        gathered = all_gather_rows(torch.arange(mine.start, mine.stop, dtype=torch.float64), ctx)
        torch.save({**result(osds), "gathered": gathered, "world_size": ctx.world_size},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def continue_worker(rank, world_size, init_file, out_dir, path, num_iterations):
    """Loads a sampler one process saved, trains it further and draws, across the process group."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        osds = OSDS.load(path, potential_fn=banana, batched_potential=True, disable_progbar=True)
        osds.continue_training(num_iterations).sample()
        torch.save({**result(osds), "world_size": osds.distributed.world_size},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(tmp_path, name, options=None, die_at=None, world_size=2, target=worker, args=None):
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    init_file = out / "init"
    args = (name, options or {}, die_at) if args is None else args
    context = mp.start_processes(target, args=(world_size, str(init_file), str(out), *args),
                                 nprocs=world_size, join=False, start_method="spawn")
    for process in context.processes:  # each on its own: a killed rank must not take the others down
        process.join(timeout=180)
        if process.is_alive():
            process.kill()
            pytest.fail("a rank hung (no error from the process group within 180 s)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)
            if (out / f"rank{r}.pt").exists()]


def assert_same_training(single, ranks, atol=1e-9):
    for rank in ranks:
        assert rank["iterations"] == single["iterations"]
        for chain_single, chain_rank in zip(single["params"], rank["params"], strict=True):
            for a, b in zip(chain_single, chain_rank, strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["banana", "two_modes"])
def test_two_ranks_train_the_sampler_one_process_trains_on_the_whole_batch(tmp_path, name):
    single = result(fit(name))
    ranks = launch(tmp_path, name)
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    # 2 ranks x 32 draws per iteration = 1 process x 64 (the same noise, gradients summed over the shards)
    assert_same_training(single, ranks)
    # every rank holds the union of the draws (150 + 151 per chain), and the same evidence from it
    a, b = ranks
    torch.testing.assert_close(a["gathered"], torch.arange(301, dtype=torch.float64), rtol=0, atol=0)
    for key in ("x", "log_weight"):
        for xa, xb in zip(a[key], b[key], strict=True):
            assert xa.shape[0] == 301
            torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    for key in ("log_z", "se", "ess", "k_hat"):
        assert a[key] == b[key]
    # the merged estimate is the one-process estimate over the same draws, and agrees with one process's
    # own (different) draws to Monte Carlo error
    from pyro_osds.ops.estimators import evidence

    pooled = evidence(torch.cat(a["log_weight"]))
    assert pooled.log_z == pytest.approx(a["log_z"], abs=1e-12) and pooled.ess == pytest.approx(a["ess"])
    assert abs(a["log_z"] - single["log_z"]) <= 4.5 * math.hypot(a["se"], single["se"]) + 1e-3
    if name == "two_modes":  # a normalised mixture: log Z = 0, its modes each with a Gaussian component
        assert abs(a["log_z"]) <= 4.5 * a["se"] + 1e-3, a["log_z"]


def test_a_killed_rank_fails_the_run_clearly_and_resume_continues(tmp_path):
    checkpoint = tmp_path / "run.pt"
    options = {"checkpoint": str(checkpoint), "checkpoint_every": 4}
    survivors = launch(tmp_path, "banana", options, die_at=7)
    assert len(survivors) == 1 and "Another rank has probably died" in survivors[0]["error"]
    assert "resume=True" in survivors[0]["error"] and checkpoint.exists()
    resumed = launch(tmp_path, "banana", {**options, "resume": True})
    uninterrupted = launch(tmp_path, "banana")
    # chain 0 goes on from its checkpoint at iteration 4, chain 1 starts: the same sampler as without the crash
    assert_same_training(uninterrupted[0], resumed, atol=0)
    assert resumed[0]["log_z"] == uninterrupted[0]["log_z"]


def test_a_sampler_one_process_saved_continues_training_across_ranks(tmp_path):
    half = fit("banana", num_iterations=6)
    half.save(tmp_path / "half.pt")
    single = OSDS.load(tmp_path / "half.pt", potential_fn=banana, batched_potential=True, disable_progbar=True)
    single = result(single.continue_training(12).sample())
    ranks = launch(tmp_path, None, target=continue_worker, args=(str(tmp_path / "half.pt"), 12))
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    assert_same_training(single, ranks)  # the last 6 iterations sharded: the same steps as one process's
    torch.testing.assert_close(ranks[0]["x"][0], ranks[1]["x"][0], rtol=0, atol=0)  # both hold the union
    assert ranks[0]["x"][0].shape[0] == OPTIONS["num_samples"]


def test_one_process_is_not_distributed():
    osds = fit("banana", num_iterations=2, num_samples=20, num_chains=1)
    assert osds.distributed is None and not dist.is_initialized()


def test_the_throughput_benchmark_reports_one_process_and_two_ranks(tmp_path):
    from benchmarks import distributed as bench

    assert bench.main(["--dims", "35", "--num-iterations", "3", "--batch-size", "32", "--num-samples", "64",
                       "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "distributed.md").read_text().splitlines()
    table = [r for r in rows if r.startswith("| ionosphere")]
    assert [r.split("|")[3].strip() for r in table] == ["1", "2"]
    assert table[0].split("|")[5].strip() == "1.00"  # the ratio column is against the one-process run
