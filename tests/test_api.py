# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""The public OSDS runner on bare potentials: construction, validation, results, persistence."""

import math

import pytest
import torch

from pyro_osds import OSDS, OSDSConfig

D64 = torch.float64
MU = torch.tensor([1.0, -0.5, 2.0], dtype=D64)
SD = torch.tensor([0.5, 1.5, 1.0], dtype=D64)
LOG_Z = float((0.5 * math.log(2 * math.pi) + SD.log()).sum())


def potential(params):
    return 0.5 * (((params["x"] - MU) / SD) ** 2).sum()


def fitted(**kw):
    options = dict(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=300,
                   preset="smoke")
    options.update(kw)
    return OSDS(**options).run()


@pytest.fixture(scope="module")
def osds():
    import pyro

    pyro.set_rng_seed(1)
    return fitted()


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


def test_unknown_options_are_refused_with_a_suggestion():
    with pytest.raises(TypeError, match="Unknown OSDS option 'num_iteration'. Did you mean 'num_iterations'"):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, num_iteration=10)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"batch_size": 1}, ValueError, "batch_size"),
        ({"precondition": "whiten"}, ValueError, "precondition"),
        ({"eval_log_det": "magic"}, ValueError, "eval_log_det"),
        ({"grid_size": 7}, ValueError, "even `grid_size`"),
        ({"preset": "fast"}, ValueError, "Unknown preset"),
        ({"preset": "smoke", "config": OSDSConfig()}, ValueError, "at most one of `preset` and `config`"),
        ({"config": {"grid_size": 8}}, TypeError, "OSDSConfig"),
    ],
)
def test_invalid_options(options, error, match):
    with pytest.raises(error, match=match):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, **options)


@pytest.mark.parametrize(
    "initial_params, error, match",
    [
        ({}, ValueError, "non-empty dict"),
        ({"x": [0.0, 1.0]}, TypeError, "must be a torch.Tensor"),
        ({"x": torch.zeros(3, dtype=torch.long)}, TypeError, "floating point"),
        ({"x": torch.tensor([0.0, math.nan, 0.0])}, ValueError, "NaN or infinite"),
        ({"x": torch.zeros(3), "y": torch.zeros(2, dtype=D64)}, ValueError, "one dtype and device"),
    ],
)
def test_bad_initial_params(initial_params, error, match):
    with pytest.raises(error, match=match):
        OSDS(potential_fn=potential, initial_params=initial_params, preset="smoke").run()


def test_potential_must_be_scalar_and_finite():
    with pytest.raises(ValueError, match="must return a scalar"):
        OSDS(potential_fn=lambda p: p["x"] ** 2, initial_params={"x": torch.zeros(3)}, preset="smoke").run()
    with pytest.raises(ValueError, match="not finite near `initial_params`"):
        OSDS(potential_fn=lambda p: p["x"].sum() * math.inf, initial_params={"x": torch.zeros(3)},
             preset="smoke").run()


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
    assert osds.get_samples(resample=True)["x"].shape == (600, 3)
    assert osds.get_samples(resample=True, group_by_chain=True)["x"].shape == (2, 300, 3)


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


def test_summary_and_diagnostics(osds, capsys):
    osds.summary(prob=0.8)
    out = capsys.readouterr().out
    for column in ("mean", "std", "median", "10.0%", "90.0%", "n_eff", "r_hat", "x[2]", "log Z ="):
        assert column in out
    diag = osds.diagnostics()
    assert set(diag["x"]) == {"n_eff", "r_hat"} and diag["x"]["r_hat"].shape == (3,)
    assert diag["divergences"] == {"chain 0": [], "chain 1": []}
    assert set(diag["log_evidence"]) == {"chain 0", "chain 1"}
    with pytest.raises(ValueError, match="prob"):
        osds.summary_dict(prob=1.5)


def test_weighted_summary_uses_the_weights(osds):
    stats = osds.summary_dict()
    x = osds.get_samples()["x"]
    w = osds.get_normalized_weights()
    torch.testing.assert_close(stats["x"]["mean"], (w[:, None] * x).sum(0))


def test_resampling_follows_the_weights():
    # a deliberately poor sampler (no training, identity preconditioner): resampling must move the draws
    osds = fitted(num_iterations=0, precondition="none", num_samples=2000)
    raw = osds.get_samples()["x"].mean(0)
    with pytest.warns(RuntimeWarning, match="effective samples"):
        resampled = osds.get_samples(resample=True)["x"].mean(0)
    weighted = osds.summary_dict()["x"]["mean"]
    assert float((resampled - weighted).abs().max()) < float((raw - weighted).abs().max())


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


def test_transforms_map_draws_back():
    exp = torch.distributions.transforms.ExpTransform()
    osds = fitted(transforms={"x": exp.inv})
    samples = osds.get_samples()["x"]
    assert bool((samples > 0).all())
    unconstrained = osds.get_samples(unconstrained=True)["x"]
    torch.testing.assert_close(samples, unconstrained.exp())


def test_non_vmappable_potential_falls_back_to_a_loop():
    def item_potential(params):
        x = params["x"]
        if float(x.detach().sum()) > 1e9:  # data-dependent control flow: not vmappable
            return x.sum()
        return potential(params)

    with pytest.warns(UserWarning, match="could not be vectorised"):
        osds = fitted(potential_fn=item_potential, num_iterations=2, num_chains=1)
    assert osds.target.vectorize == "loop"
    assert osds.get_samples()["x"].shape == (300, 3)


def test_batched_potential_flag():
    def batched(params):
        return 0.5 * (((params["x"] - MU) / SD) ** 2).sum(-1)

    osds = fitted(potential_fn=batched, batched_potential=True, num_iterations=2, num_chains=1)
    assert osds.target.vectorize == "batched"
    assert math.isfinite(osds.log_evidence().log_z)


def test_hook_receives_chain_step_and_info():
    seen = []
    fitted(hook_fn=lambda chain, step, info: seen.append((chain, step, "loss" in info)), num_iterations=3)
    assert seen == [(0, 1, True), (0, 2, True), (0, 3, True), (1, 1, True), (1, 2, True), (1, 3, True)]


def test_chains_are_independent_and_seeded():
    import pyro

    pyro.set_rng_seed(7)
    a = fitted(num_iterations=3)
    pyro.set_rng_seed(7)
    b = fitted(num_iterations=3)
    xa, xb = a.get_samples(group_by_chain=True)["x"], b.get_samples(group_by_chain=True)["x"]
    assert torch.equal(xa, xb)  # same seed, bit-identical draws on CPU
    assert not torch.equal(xa[0], xa[1])  # chains draw from independent streams


# ------------------------------------------------------------------------------------------------
# persistence
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


def test_repr(osds):
    assert "OSDS(potential_fn" in repr(osds) and "trained" in repr(osds)
