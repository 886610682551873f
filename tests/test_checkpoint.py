# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.checkpoint: save and load, checkpoint files, exact resumption after a kill, refused files."""

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

from pyro_osds import OSDS
from tests.common import D64, assert_same_training, fitted_module_osds, make, potential, quartic_potential

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def osds():
    return fitted_module_osds()


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
         early_stopping=False, disable_progbar=True).run()
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


def test_load_then_continue_training(tmp_path):
    pyro.set_rng_seed(0)
    partial = make(num_iterations=6).run()
    partial.save(tmp_path / "a.pt")
    loaded = OSDS.load(tmp_path / "a.pt", potential_fn=quartic_potential)
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
        OSDS.load(path, potential_fn=quartic_potential)


def test_loading_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_osds.OSDS/1", "payload": Evil()}, path)
    with pytest.raises(ValueError, match="truncated, corrupted or not a checkpoint"):
        OSDS.load(path, potential_fn=quartic_potential)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------
# saved runners
def test_save_load_gives_identical_draws(osds, tmp_path):
    path = tmp_path / "osds.pt"
    osds.save(path)
    loaded = OSDS.load(path, potential_fn=potential)
    torch.testing.assert_close(loaded.get_samples()["x"], osds.get_samples()["x"], rtol=0, atol=0)
    assert loaded.log_evidence().log_z == osds.log_evidence().log_z
    # the samplers' generators were saved too: new draws agree as well
    osds.sample(100)
    loaded.sample(100)
    torch.testing.assert_close(loaded.get_samples()["x"], osds.get_samples()["x"], rtol=0, atol=0)
    osds.sample(300)


def test_load_rejects_bad_files(osds, tmp_path):
    path = tmp_path / "osds.pt"
    osds.save(path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupted or not a checkpoint"):
        OSDS.load(tmp_path / "truncated.pt", potential_fn=potential)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro_osds OSDS checkpoint"):
        OSDS.load(tmp_path / "other.pt", potential_fn=potential)
    with pytest.raises(ValueError, match="made for a potential, not a model"):
        OSDS.load(path, lambda: None)
    with pytest.raises(ValueError, match="do not match"):
        OSDS.load(path, potential_fn=lambda p: 0.5 * (p["x"] ** 2).sum(), initial_params={"x": torch.zeros(4, dtype=D64)})


def test_methods_round_trip_through_checkpoints(tmp_path):
    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, method="cdds",
                preset="smoke", num_samples=50, num_chains=1).run()
    osds.save(tmp_path / "cdds.pt")
    loaded = OSDS.load(tmp_path / "cdds.pt", potential_fn=potential)
    assert loaded.config.method == "cdds" and len(loaded.samplers[0].trainers) == 2
    assert loaded.log_evidence().log_z == osds.log_evidence().log_z
    osds.sample(20)
    loaded.sample(20)
    torch.testing.assert_close(loaded.get_samples()["x"], osds.get_samples()["x"], rtol=0, atol=0)


def test_the_trained_and_the_drawn_step_counts_survive_a_reload(tmp_path):
    osds = make(num_iterations=3, num_steps=2, num_chains=1).run()
    osds.sample(40, num_steps=1)
    osds.save(tmp_path / "steps.pt")
    loaded = OSDS.load(tmp_path / "steps.pt", potential_fn=quartic_potential)
    assert (loaded.num_steps, loaded.config.evaluation.num_steps) == (1, 2)
    assert loaded.samplers[0].trained_step_counts == (1, 2) and loaded.config == osds.config
    assert loaded.log_evidence().log_z == osds.log_evidence().log_z


def test_resuming_with_another_step_count_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    make(num_iterations=3, num_chains=1, checkpoint=path).run()
    with pytest.raises(ValueError, match=r"num_steps \(checkpoint 1, now 2\)"):
        make(num_iterations=6, num_chains=1, num_steps=2, checkpoint=path, resume=True).run()


def test_statistics_read_every_n_iterations_are_checkpointed_and_resumed(tmp_path):
    # the GPU's mode on the CPU: a checkpoint (every 4 iterations) reads the statistics of the iterations before it
    path = tmp_path / "run.pt"
    first = make(num_iterations=10, num_chains=1, sync_every=5, checkpoint=path, checkpoint_every=4).run()
    assert first.samplers[0].trainer.sync_every == 5
    loaded = OSDS.load(path, potential_fn=quartic_potential)
    trainer = loaded.samplers[0].trainer
    assert trainer.step == 10 and trainer.history["loss"] == first.samplers[0].trainer.history["loss"]
    loaded.continue_training(13).sample()
    assert trainer.step == 13 and len(trainer.history["loss"]) == 13
    assert all(isinstance(v, float) for v in trainer.history["loss"])
    assert loaded.log_evidence().num_draws == 100
