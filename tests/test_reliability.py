# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Interruption, checkpoints and exact resumption, reproducibility, bounded memory, hostile input."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_osds import OSDS, EvidenceError, TrainingDivergedError, UnsupportedModelError

D64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


def potential(params):
    x = params["x"]
    return 0.5 * (((x - 1.0) / 0.7) ** 2).sum() + 0.1 * (x**4).sum()


def make(**kw):
    options = dict(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=100,
                   preset="smoke")
    options.update(kw)
    return OSDS(**options)


def net_params(osds):
    return [p.detach().clone() for s in osds.samplers for p in list(s.trainer.net.parameters())
            + list(s.trainer.ema.parameters())]


def assert_same_training(a, b):
    pa, pb = net_params(a), net_params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a.samplers, b.samplers, strict=True):
        assert sa.trainer.step == sb.trainer.step
        assert sa.trainer.history["loss"] == sb.trainer.history["loss"]


# ------------------------------------------------------------------------------------------------
# interruption and resumption
SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyro
    torch.set_num_threads(1)
    sys.path.insert(0, {repo!r})
    from pyro_osds import OSDS
    D64 = torch.float64
    def potential(params):
        x = params["x"]
        return 0.5 * (((x - 1.0) / 0.7) ** 2).sum() + 0.1 * (x ** 4).sum()
    pyro.set_rng_seed(0)
    OSDS(potential_fn=potential, initial_params={{"x": torch.zeros(3, dtype=D64)}}, num_samples=100,
         preset="smoke", num_iterations={iters}, checkpoint={path!r}, checkpoint_every=5,
         disable_progbar=True).run()
    """
)


def test_killed_training_resumes_exactly(tmp_path):
    iters = 400
    path = tmp_path / "ckpt.pt"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(repo=str(REPO), iters=iters, path=str(path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", CI="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        deadline = time.time() + 120
        while not path.exists():
            assert proc.poll() is None, "the training process ended before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint written within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: only the atomic checkpoint survives
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(path, weights_only=True)
    steps = [t["step"] for s in state["samplers"] for t in s["trainers"]]
    assert sum(steps) < 2 * iters, "the process was killed after training had finished"

    pyro.set_rng_seed(123)  # the resumed run's global seed must not matter
    resumed = make(num_iterations=iters, checkpoint=path, checkpoint_every=5, resume=True).run()
    pyro.set_rng_seed(0)
    reference = make(num_iterations=iters).run()
    assert_same_training(resumed, reference)


def test_keyboard_interrupt_keeps_a_usable_sampler(tmp_path):
    def hook(chain, step, info):
        if chain == 0 and step == 4:
            raise KeyboardInterrupt

    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning) as record:
        osds = make(num_iterations=10, hook_fn=hook).run()
    messages = " ".join(str(w.message) for w in record)
    assert "interrupted at iteration 4" in messages and "continue_training" in messages
    assert osds.interrupted and len(osds.samplers) == 1 and osds.samplers[0].trainer.step == 4
    assert osds.get_samples()["x"].shape == (100, 3)
    assert math.isfinite(osds.log_evidence().log_z)
    osds.save(tmp_path / "partial.pt")
    osds.hook_fn = None
    osds.continue_training().sample()
    assert not osds.interrupted and [s.trainer.step for s in osds.samplers] == [10, 10]
    pyro.set_rng_seed(0)
    assert_same_training(osds, make(num_iterations=10).run())


def test_load_then_continue_training(tmp_path):
    pyro.set_rng_seed(0)
    partial = make(num_iterations=6).run()
    partial.save(tmp_path / "a.pt")
    loaded = OSDS.load(tmp_path / "a.pt", potential_fn=potential)
    loaded.continue_training(num_iterations=12)
    assert [s.trainer.step for s in loaded.samplers] == [12, 12]
    partial.continue_training(num_iterations=12)
    assert_same_training(loaded, partial)


def test_resume_without_a_checkpoint_file_starts_afresh(tmp_path):
    path = tmp_path / "none_yet.pt"
    pyro.set_rng_seed(0)
    osds = make(num_iterations=5, checkpoint=path, resume=True).run()
    assert path.exists() and [s.trainer.step for s in osds.samplers] == [5, 5]
    pyro.set_rng_seed(0)
    assert_same_training(osds, make(num_iterations=5).run())


def test_resume_refuses_foreign_checkpoints(tmp_path):
    path = tmp_path / "ckpt.pt"
    make(num_iterations=3, checkpoint=path).run()
    with pytest.raises(ValueError, match="different settings.*hidden_dim"):
        make(num_iterations=3, checkpoint=path, resume=True, hidden_dim=8).run()
    with pytest.raises(ValueError, match="do not match"):
        make(potential_fn=lambda p: (p["y"] ** 2).sum(), initial_params={"y": torch.zeros(2, dtype=D64)},
             checkpoint=path, resume=True).run()
    with pytest.raises(ValueError, match="checkpoint has 2 chains"):
        make(num_chains=3, checkpoint=path, resume=True).run()
    # a longer run may resume a shorter one
    osds = make(num_iterations=6, checkpoint=path, resume=True).run()
    assert [s.trainer.step for s in osds.samplers] == [6, 6]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated, corrupted or not a checkpoint"):
        make(checkpoint=path, resume=True).run()
    with pytest.raises(ValueError, match="needs `checkpoint=<path>`"):
        make(resume=True)


def test_checkpoints_from_another_version_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    osds = make(num_iterations=2).run()
    state = osds.state_dict()
    state["version"] = "0.0.1"
    torch.save(state, path)
    with pytest.raises(ValueError, match="written by pyro_osds 0.0.1"):
        OSDS.load(path, potential_fn=potential)


def test_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_osds.OSDS/1", "payload": Evil()}, path)
    with pytest.raises(ValueError, match="truncated, corrupted or not a checkpoint"):
        OSDS.load(path, potential_fn=potential)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------
# reproducibility and resources
def test_same_seed_same_bits():
    pyro.set_rng_seed(3)
    a = make(num_iterations=4).run()
    pyro.set_rng_seed(3)
    b = make(num_iterations=4).run()
    assert torch.equal(a.get_samples()["x"], b.get_samples()["x"])
    assert a.log_evidence() == b.log_evidence()


def test_chunked_draws(tmp_path):
    osds = make(num_iterations=3, chunk_size=7).run()
    ev = osds.log_evidence()
    assert osds.get_samples()["x"].shape == (200, 3) and math.isfinite(ev.log_z)
    assert osds.to_datatree()["posterior"]["x"].shape == (2, 100, 3)


def test_training_that_keeps_diverging_stops_with_advice():
    calls = {"n": 0}

    def exploding(params):
        calls["n"] += 1
        x = params["x"]
        # finite at the start (so the model passes its checks), NaN everywhere the sampler goes later
        return torch.where(x.abs().sum() < 1e-12, (x**2).sum(), x.sum() * math.nan)

    with pytest.raises((TrainingDivergedError, ValueError)):
        make(potential_fn=exploding, num_iterations=60, max_consecutive_skips=5, precondition="none").run()


# ------------------------------------------------------------------------------------------------
# property-based: any input either works or raises one of the documented errors
DOCUMENTED = (ValueError, TypeError, UnsupportedModelError, EvidenceError, TrainingDivergedError)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    num_samples=st.one_of(st.integers(-2, 40), st.floats(-1, 5), st.none()),
    num_chains=st.sampled_from([1, 2, 0, -1, 1.5, True]),
    num_steps=st.sampled_from([1, 2, 3, 4, 16, 0]),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-1e3, 1e3),
)
def test_public_api_works_or_raises_documented_errors(shape, num_samples, num_chains, num_steps, scale, shift):
    init = {"x": torch.zeros(tuple(shape), dtype=D64)}

    def pot(params):
        return 0.5 * (((params["x"] - shift) / scale) ** 2).sum()

    kwargs = dict(potential_fn=pot, initial_params=init, num_chains=num_chains, num_steps=num_steps,
                  preset="smoke", num_iterations=2, disable_progbar=True)
    if num_samples is not None:
        kwargs["num_samples"] = num_samples
    try:
        osds = OSDS(**kwargs).run()
    except DOCUMENTED:
        return
    samples = osds.get_samples()["x"]
    assert samples.shape[1:] == tuple(shape)
    ev = osds.log_evidence()
    assert not math.isnan(ev.log_z)
