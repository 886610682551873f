# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.api: the OSDS runner on bare potentials (construction, methods, results, interruption)."""

import math
import multiprocessing
import signal
import sys
import threading
import time
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_osds
from pyro_osds import (
    OSDS,
    EvidenceError,
    TrainingDivergedError,
    UnreliableEvidenceWarning,
    UnsupportedModelError,
    compare,
)
from pyro_osds.chains import choose_chain_method
from pyro_osds.samplers import MixtureSampler
from tests.common import (
    D64,
    LOG_Z,
    MU,
    SD,
    Z,
    assert_same_training,
    fitted,
    fitted_module_osds,
    make,
    mixture_potential,
    potential,
    within,
)


@pytest.fixture(scope="module")
def osds():
    return fitted_module_osds()


# ------------------------------------------------------------------------------------------------
# construction and validation
def test_model_xor_potential():
    with pytest.raises(ValueError, match="Only one of `model` or `potential_fn` must be specified."):
        OSDS()
    with pytest.raises(ValueError, match="Only one of `model` or `potential_fn` must be specified."):
        OSDS(lambda: None, potential_fn=potential, initial_params={"x": torch.zeros(3)})


def test_potential_needs_initial_params():
    with pytest.raises(ValueError, match="`initial_params` must be provided"):
        OSDS(potential_fn=potential)


@pytest.mark.parametrize("name", ["num_samples", "num_chains", "num_steps"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "4"])
def test_counts_must_be_positive_integers(name, bad):
    with pytest.raises(ValueError, match=f"`{name}` must be an integer >= 1"):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, **{name: bad})


def test_num_steps_must_divide_the_grid():
    with pytest.raises(ValueError, match="does not divide the fine grid"):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, num_steps=3, grid_size=32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="CUDA is not available"):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, device="cuda")


def test_run_takes_no_arguments_for_a_potential():
    with pytest.raises(TypeError, match="takes no model arguments"):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, preset="smoke").run(1.0)


def test_results_before_run_raise():
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)})
    for call in (osds.get_samples, osds.log_evidence, osds.sample, osds.diagnostics):
        with pytest.raises(RuntimeError, match="Call `run"):
            call()


# ------------------------------------------------------------------------------------------------
# results
def test_sample_shapes(osds):
    assert osds.get_samples()["x"].shape == (600, 3)
    assert osds.get_samples(group_by_chain=True)["x"].shape == (2, 300, 3)
    assert osds.get_samples(num_samples=50)["x"].shape == (50, 3)
    assert osds.get_samples(num_samples=50, group_by_chain=True)["x"].shape == (2, 50, 3)
    assert osds.get_samples(resample=False)["x"].shape == (600, 3)
    assert osds.get_samples(resample=False, group_by_chain=True)["x"].shape == (2, 300, 3)


def test_get_samples_are_resampled_by_default_and_the_same_on_every_call(osds):
    raw = osds.get_samples(resample=False)["x"]
    torch.testing.assert_close(raw, torch.cat([d.x for d in osds.draws]), rtol=0, atol=0)  # the weights' order
    grouped = osds.get_samples(group_by_chain=True)["x"]
    torch.testing.assert_close(grouped, osds.get_samples(group_by_chain=True)["x"], rtol=0, atol=0)
    torch.testing.assert_close(osds.get_samples()["x"], osds.get_samples()["x"], rtol=0, atol=0)
    # per chain: each resampled draw is one of that chain's draws, kept floor(N w) or ceil(N w) times
    for c in range(2):
        chain_raw, log_w = osds.draws[c].x, osds.draws[c].log_weight
        match = (grouped[c][:, None, :] == chain_raw[None, :, :]).all(-1)
        assert bool((match.sum(1) >= 1).all())
        counts = match.double().sum(0)
        expected = 300 * torch.softmax(log_w, 0)
        assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all())
    # new draws resample afresh
    before = osds.get_samples()["x"]
    state = [d for d in osds.draws]
    osds.sample()
    assert not torch.equal(before, osds.get_samples()["x"])
    osds.draws = tuple(state)


def test_weights_and_evidence_accessors(osds):
    ev = osds.log_evidence()
    assert len(ev.chains) == 2 and ev.num_draws == 600 and ev.num_steps == 1 and ev.log_det == "exact"
    assert all(math.isfinite(v) for v in (ev.log_z, ev.se, ev.elbo, ev.ess))
    assert ev.elbo <= ev.log_z + 1e-12  # Jensen, on the same draws
    weights = osds.get_normalized_weights()
    assert weights.shape == (600,) and float(weights.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(osds.get_normalized_weights(log_scale=True).exp(), weights)
    assert float(osds.get_log_normalizer()) == pytest.approx(ev.log_z)
    assert 1.0 <= float(osds.get_ESS()) <= 600.0
    assert "log Z =" in str(ev) and "chain 1" in str(ev)


def test_sample_again_with_more_steps(osds):
    with pytest.warns(UserWarning, match="The 2-step flow was not trained"):
        osds.sample(200, num_steps=2)
    assert osds.get_samples()["x"].shape == (400, 3)
    assert osds.log_evidence().num_steps == 2
    with pytest.raises(ValueError, match="does not divide"):
        osds.sample(10, num_steps=3)
    osds.sample(300, num_steps=1)


def test_num_steps_is_trained_by_the_one_step_objective():
    osds = fitted(num_steps=2, num_iterations=2)
    assert osds.config.objective.flow_kl.steps == (1,)  # the configuration is the user's
    assert osds.samplers[0].trained_step_counts == (1, 2)  # the chains train the step count they draw with
    paper = fitted(num_steps=2, num_iterations=2, preset="paper-cpu", config=None)
    assert paper.samplers[0].trained_step_counts is None  # the paper's objective trains every step size


def test_hook_receives_chain_step_and_info():
    seen = []
    fitted(hook_fn=lambda chain, step, info: seen.append((chain, step, "loss" in info)), num_iterations=3)
    # chains may train at once (threads): each chain's steps in order, every step once
    assert sorted(seen) == [(0, 1, True), (0, 2, True), (0, 3, True), (1, 1, True), (1, 2, True), (1, 3, True)]
    assert [s for c, s, _ in seen if c == 0] == [s for c, s, _ in seen if c == 1] == [1, 2, 3]


def test_chains_are_independent_and_seeded():
    pyro.set_rng_seed(7)
    a = fitted(num_iterations=3)
    pyro.set_rng_seed(7)
    b = fitted(num_iterations=3)
    xa, xb = a.get_samples(group_by_chain=True)["x"], b.get_samples(group_by_chain=True)["x"]
    assert torch.equal(xa, xb)  # same seed, bit-identical draws on CPU
    assert not torch.equal(xa[0], xa[1])  # chains draw from independent streams


def test_repr(osds):
    assert "OSDS(potential_fn" in repr(osds) and "trained" in repr(osds)


# ------------------------------------------------------------------------------------------------
# the training methods side by side: OSDS, DIS, SCDS, CDDS (issue #5)
@pytest.mark.parametrize("method", ["osds", "dis", "scds", "cdds"])
def test_each_method_recovers_a_gaussian(method):
    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, method=method,
                num_samples=2000, num_chains=1, num_iterations=60, consistency_iterations=300, grid_size=16).run()
    assert osds.config.method == method
    assert osds.num_steps == (16 if method == "dis" else 1)
    ev = osds.log_evidence()
    assert ev.num_folded == 0
    assert abs(ev.log_z - LOG_Z) <= Z * ev.se + 0.5 * ev.se**2 + 1e-9, ev
    stats = osds.summary_dict()["x"]
    assert bool(((stats["mean"] - MU).abs() <= Z * SD / math.sqrt(ev.ess)).all()), stats["mean"]
    assert bool(((stats["std"] / SD - 1).abs() <= Z / math.sqrt(2 * ev.ess) + 0.01).all()), stats["std"]


def test_cdds_multi_step_draws_have_no_weights():
    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, method="cdds",
                preset="smoke", num_samples=50, num_chains=1).run()
    assert math.isfinite(osds.log_evidence().log_z)
    osds.sample(50, num_steps=4)
    assert osds.get_samples()["x"].shape == (50, 3)
    with pytest.raises(EvidenceError, match="carry no importance weights"):
        osds.log_evidence()
    with pytest.raises(ValueError, match="no tractable density"):
        osds.samplers[0].evidence(50, num_steps=2)
    with pytest.raises(ValueError, match="CDDS has no EM paths"):
        osds.samplers[0].em_evidence(50)


# ------------------------------------------------------------------------------------------------
# interruption
@pytest.mark.parametrize("chain_method", ["sequential", "threads"])
def test_keyboard_interrupt_keeps_a_usable_sampler(tmp_path, chain_method):
    def hook(chain, step, info):
        if chain == 0 and step == 4:
            raise KeyboardInterrupt

    pyro.set_rng_seed(0)
    with pytest.warns(RuntimeWarning) as record:
        osds = make(num_iterations=10, hook_fn=hook, chain_method=chain_method).run()
    messages = " ".join(str(w.message) for w in record)
    assert "interrupted at iteration 4" in messages and "continue_training" in messages
    assert osds.interrupted and osds.samplers[0].trainer.step == 4
    if chain_method == "sequential":  # chain 1 never started
        assert len(osds.samplers) == 1
    else:  # chain 1 trained at the same time and stopped with chain 0 (unless it had finished already)
        assert len(osds.samplers) == 2 and (osds.samplers[1].interrupted or osds.samplers[1].trainer.step == 10)
    assert osds.get_samples()["x"].shape == (100 * len(osds.samplers), 3)
    assert math.isfinite(osds.log_evidence().log_z)
    osds.save(tmp_path / "partial.pt")
    osds.hook_fn = None
    osds.continue_training().sample()
    assert not osds.interrupted and [s.trainer.step for s in osds.samplers] == [10, 10]
    pyro.set_rng_seed(0)
    assert_same_training(osds, make(num_iterations=10).run())


def _small_pyro_model(x, y):
    coef = pyro.sample("coef", dist.Normal(torch.zeros(2, dtype=D64), 2.0).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0, dtype=D64)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(coef[..., :1] + coef[..., 1:] * x, scale), obs=y)


@pytest.mark.parametrize("chain_method", ["threads", "processes"])
def test_chains_trained_at_once_equal_chains_trained_in_turn(chain_method):
    # a Pyro model: in threads its potential enters Pyro's global effect-handler stack one chain at a time; in
    # processes each chain trains a forked copy and sends its state back
    x, y = torch.arange(5, dtype=D64), torch.tensor([0.3, -1.2, 0.8, 2.0, 0.1], dtype=D64)
    runs = []
    for method in ("sequential", chain_method):
        pyro.set_rng_seed(0)
        runs.append(OSDS(_small_pyro_model, num_iterations=40, batch_size=64, num_samples=200, chain_method=method,
                         disable_progbar=True).run(x, y))
    assert_same_training(*runs)
    for a, b in zip(runs[0].draws, runs[1].draws, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.log_weight, b.log_weight)


def _chain_method_here():
    return choose_chain_method("auto", 2, device=torch.device("cpu"))[0]


def test_how_the_chains_train_by_default():
    assert torch.get_num_threads() == 1  # the test suite's setting
    cpu = torch.device("cpu")
    at_once = "processes" if sys.platform.startswith("linux") else "threads"
    assert choose_chain_method("auto", 2, device=cpu) == (at_once, 2)  # this machine has 2 cores
    assert choose_chain_method("auto", 2, device=cpu, hook_fn=print) == ("threads", 2)  # a hook runs here
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a pool's daemonic worker may not fork: threads
        assert pool.apply(_chain_method_here) == "threads"
    # one after the other with a checkpoint (it holds every chain), off the CPU, across ranks, or for one chain
    assert choose_chain_method("auto", 2, device=cpu, checkpoint="run.pt") == ("sequential", 1)
    assert choose_chain_method("auto", 2, device=torch.device("cuda")) == ("sequential", 1)
    assert choose_chain_method("threads", 2, device=cpu, distributed=object()) == ("sequential", 1)
    assert choose_chain_method("processes", 1, device=cpu) == ("sequential", 1)
    assert choose_chain_method("threads", 4, device=cpu) == ("threads", 4)  # as asked: every chain at once
    with pytest.raises(ValueError, match="`hook_fn` cannot be called from chains training in processes"):
        OSDS(_small_pyro_model, hook_fn=lambda *a: None, chain_method="processes")
    with pytest.raises(ValueError, match="with `checkpoint` the chains train one after the other"):
        OSDS(_small_pyro_model, checkpoint="unused.pt", chain_method="threads")
    with pytest.raises(ValueError, match="chain_method"):
        OSDS(_small_pyro_model, chain_method="parallel")


def test_a_chain_whose_process_fails_raises_its_error_here():
    x, y = torch.arange(5, dtype=D64), torch.tensor([0.3, -1.2, 0.8, 2.0, 0.1], dtype=D64)
    runner = OSDS(_small_pyro_model, num_iterations=5, batch_size=16, chain_method="processes",
                  disable_progbar=True).setup(x, y)

    def failing_chain(chain, state=None, build=runner._new_chain):  # runs in chain 1's process
        if state is None and chain == 1:
            raise ValueError("chain 1 cannot start")
        return build(chain, state)

    runner._new_chain = failing_chain
    with pytest.raises(ValueError, match="chain 1 cannot start"):
        runner.fit(x, y)
    assert len(runner.samplers) == 1  # chain 0 trained and is kept


def test_warnings_of_chains_training_in_threads_point_at_the_users_line():
    def modeless(x, y):  # y regressed on itself: a perfect fit, so the density grows without bound as scale -> 0
        _small_pyro_model(y, y)

    x = torch.tensor([0.3, -1.2, 0.8, 2.0, 0.1], dtype=D64)
    with pytest.warns(RuntimeWarning, match="No Laplace fit converged") as record:
        OSDS(modeless, preset="smoke", num_samples=50, chain_method="threads", disable_progbar=True).run(x, x)
    ours = [w for w in record if "No Laplace fit converged" in str(w.message)]
    assert len(ours) == 2 and all(w.filename == __file__ for w in ours)


def test_ctrl_c_stops_every_chain_training_in_threads():
    chain_0_waits = threading.Event()

    def hook(chain, step, info):
        if step != 3:
            return
        # Ctrl-C: SIGINT to the main thread, which waits for the chains (a terminal's Ctrl-C reaches it the same
        # way; a real signal also wakes it from a blocking wait, which `_thread.interrupt_main` does not). Both
        # chains wait at iteration 3 until the main thread has handled it (else the test races), and it is sent
        # again until the main thread has set the stop event.
        if chain == 0:
            chain_0_waits.set()
        else:
            assert chain_0_waits.wait(timeout=60)
        for _ in range(600):
            if chain == 1 and not runner._stop_training.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if runner._stop_training.wait(timeout=0.1):
                break
        assert runner._stop_training.is_set()

    pyro.set_rng_seed(0)
    runner = make(num_iterations=40, hook_fn=hook, chain_method="threads")
    # a process started in the background by a non-interactive shell (as CI jobs often are) inherits SIGINT
    # ignored, and Python then installs no handler: Ctrl-C could not reach it, so the test installs Python's own
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.warns(RuntimeWarning) as record:
            osds = runner.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "continue_training" in " ".join(str(w.message) for w in record)
    assert osds.interrupted and len(osds.samplers) == 2
    assert all(s.interrupted and 3 <= s.trainer.step < 40 for s in osds.samplers)
    osds.hook_fn = None
    osds.continue_training()
    assert not osds.interrupted and [s.trainer.step for s in osds.samplers] == [40, 40]
    pyro.set_rng_seed(0)
    assert_same_training(osds, make(num_iterations=40, chain_method="threads").run())


def test_ctrl_c_stops_every_chain_training_in_processes():
    import multiprocessing

    def ctrl_c():  # a terminal's Ctrl-C, once both chains' processes have trained a while
        for _ in range(600):
            if len(multiprocessing.active_children()) == 2:
                break
            time.sleep(0.05)
        time.sleep(2.0)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    x, y = torch.arange(5, dtype=D64), torch.tensor([0.3, -1.2, 0.8, 2.0, 0.1], dtype=D64)
    pyro.set_rng_seed(0)
    runner = OSDS(_small_pyro_model, num_iterations=100_000, batch_size=16, num_samples=100, early_stopping=False,
                  chain_method="processes", disable_progbar=True)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # see the test above
    sender = threading.Thread(target=ctrl_c)
    sender.start()
    try:
        with pytest.warns(RuntimeWarning) as record:
            osds = runner.fit(x, y)
    finally:
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert "continue_training" in " ".join(str(w.message) for w in record)
    assert osds.interrupted and len(osds.samplers) == 2
    steps = [s.trainer.step for s in osds.samplers]
    assert all(s.interrupted for s in osds.samplers) and all(1 <= step < 100_000 for step in steps)
    assert math.isfinite(osds.sample().log_evidence().log_z)
    osds.continue_training(num_iterations=max(steps) + 3)
    assert not osds.interrupted and [s.trainer.step for s in osds.samplers] == [max(steps) + 3] * 2


# ------------------------------------------------------------------------------------------------
# lost modes
def test_osds_sample_warns_about_a_lost_mode_per_chain(tmp_path):
    def potential(p):
        return mixture_potential(p["x"])

    pyro.set_rng_seed(0)
    # one flow for both modes (`components="single"`): the one-step objective drops the lighter one
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(2, dtype=D64)}, components="single",
                batched_potential=True, num_chains=1, num_samples=4000, num_iterations=300, disable_progbar=True)
    lost = "Chain 0: The draws carry almost no weight near 1 of the 2 modes"
    with pytest.warns(UserWarning, match="separated modes"), pytest.warns(RuntimeWarning, match=lost):
        osds.run()
    # the found modes are saved with the sampler, so a loaded one still checks its draws
    osds.save(tmp_path / "mixture.pt")
    loaded = OSDS.load(tmp_path / "mixture.pt", potential_fn=potential)
    with pytest.warns(RuntimeWarning, match=lost):
        loaded.sample(4000)


# ------------------------------------------------------------------------------------------------
# reproducibility and resources
def test_same_seed_same_bits():
    pyro.set_rng_seed(3)
    a = make(num_iterations=4).run()
    pyro.set_rng_seed(3)
    b = make(num_iterations=4).run()
    assert torch.equal(a.get_samples()["x"], b.get_samples()["x"])
    ev_a, ev_b = a.log_evidence(), b.log_evidence()
    assert ev_a._replace(cost=None) == ev_b._replace(cost=None)
    # the same work, counted the same; only the wall time differs
    assert [p[1:] for p in ev_a.cost] == [p[1:] for p in ev_b.cost]


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


def test_a_multimodal_target_gets_one_component_per_mode_and_the_right_evidence(tmp_path):
    # the same 0.3 / 0.7 mixture (log Z = 0): by default each chain is a mixture with a component per mode
    def potential(p):
        return mixture_potential(p["x"])

    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(2, dtype=D64)}, batched_potential=True,
                num_samples=4000, num_iterations=300, disable_progbar=True).run()
    assert all(isinstance(s, MixtureSampler) and len(s.components) == 2 for s in osds.samplers)
    ev = osds.log_evidence()
    assert abs(ev.log_z) <= Z * ev.se + 0.5 * ev.se**2 and ev.ess_per_draw > 0.9, ev
    w = osds.get_normalized_weights()
    right = float(w[osds.get_samples(resample=False)["x"][:, 0] > 0].sum())
    assert abs(right - 0.7) <= Z * math.sqrt(0.21 / ev.ess), right
    osds.save(tmp_path / "mixture.pt")  # the components come back without a new search
    loaded = OSDS.load(tmp_path / "mixture.pt", potential_fn=potential)
    assert loaded.log_evidence().log_z == ev.log_z and isinstance(loaded.samplers[0], MixtureSampler)


def test_a_product_of_bimodal_factors_gets_every_well_or_is_flagged(tmp_path):
    # 12 independent double wells: 4096 modes of equal mass, more than the mode search can enumerate. The
    # marginal-mixture preconditioner splits every coordinate across its wells: log Z right, every well half
    # the mass. Without it one flow covers a few modes, log Z is low by about log(4096 / modes kept) and the
    # weights cannot show it: the evidence must then say it is unreliable rather than return a confident
    # wrong answer.
    def potential(p):
        return ((p["x"] ** 2 - 4.0) ** 2).sum(-1)

    grid = torch.linspace(-5.0, 5.0, 20001, dtype=D64)
    true_log_z = 12 * math.log(float(torch.trapezoid(torch.exp(-((grid**2 - 4.0) ** 2)), grid)))

    def run(**options):
        pyro.set_rng_seed(0)
        return OSDS(potential_fn=potential, initial_params={"x": torch.zeros(12, dtype=D64)},
                    batched_potential=True, num_chains=1, num_samples=2000, num_iterations=100,
                    disable_progbar=True, **options)

    with pytest.warns(UserWarning, match="marginal mixture fitted to the weights"):
        osds = run().run()
    ev = osds.log_evidence()
    assert within(ev.log_z, true_log_z, ev.se) and ev.ess_per_draw > 0.5, ev
    assert not ev.too_many_modes and ev.num_lost_modes == 0
    x, w = osds.get_samples(resample=False)["x"], osds.get_normalized_weights()
    assert torch.allclose((x > 0).to(D64).T @ w.to(D64), torch.full((12,), 0.5, dtype=D64), atol=0.05)
    osds.save(tmp_path / "wells.pt")  # the marginal mixture survives saving and loading
    assert OSDS.load(tmp_path / "wells.pt", potential_fn=potential).log_evidence().log_z == ev.log_z

    with pytest.warns(UserWarning, match="kept finding new modes until its budget ran out"):
        gaussian = run(marginal_components=0).run()
    ev = gaussian.log_evidence()
    assert ev.too_many_modes and not ev.reliable and "could enumerate" in str(ev)
    assert ev.log_z < true_log_z - 3.0  # the flag is not a formality: the estimate misses most modes
    with pytest.warns(UserWarning, match="more modes than the mode search could enumerate"):
        table = compare({"wells": gaussian})
    assert bool(table.loc["wells", "too_many_modes"]) and not table.loc["wells", "reliable"]
    gaussian.save(tmp_path / "gaussian.pt")  # the finding survives saving and loading
    assert OSDS.load(tmp_path / "gaussian.pt", potential_fn=potential).log_evidence().too_many_modes


def test_heavy_tailed_weights_warn_at_draw_time():
    # an untrained sampler with the identity preconditioner on a narrow, shifted Gaussian: heavy-tailed weights
    with pytest.warns(UnreliableEvidenceWarning, match=r"k-hat \d\.\d\d > 0.5 \(chain 0 .*check log Z"):
        osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=500,
                    preset="smoke", num_iterations=0, precondition="none", num_chains=1, disable_progbar=True).run()
    assert not osds.log_evidence().tail_ok
    # a well-fitted one does not warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreliableEvidenceWarning)
        osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=500,
                    preset="smoke", num_chains=1, disable_progbar=True).run()
    assert osds.log_evidence().tail_ok


def test_public_names():
    assert sorted(pyro_osds.__all__) == sorted([
        "EvidenceError", "LogEvidence", "OSDS", "OSDSConfig", "TrainingDivergedError", "UnreliableEvidenceWarning",
        "UnsupportedModelError",
        "__version__", "compare", "to_datatree", "to_inference_data"])
    for name in pyro_osds.__all__:
        getattr(pyro_osds, name)
