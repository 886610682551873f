# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""The training methods side by side: OSDS, DIS, SCDS, CDDS (issue #5)."""

import math

import pyro
import pytest
import torch

from pyro_osds import OSDS, EvidenceError, OSDSConfig
from pyro_osds.ops.consistency import consistency_function, consistency_grid, skip_scalings
from pyro_osds.ops.integrate import flow
from pyro_osds.sampler import FlowSampler

D64 = torch.float64
Z = 4.5  # per-assertion false-alarm rate < 1e-5
MU = torch.tensor([1.0, -0.5, 2.0], dtype=D64)
SD = torch.tensor([0.5, 1.5, 1.0], dtype=D64)
LOG_Z = float((0.5 * math.log(2 * math.pi) + SD.log()).sum())


def potential(params):
    return 0.5 * (((params["x"] - MU) / SD) ** 2).sum()


def batched(x):
    return 0.5 * (((x - MU) / SD) ** 2).sum(-1)


@pytest.mark.parametrize("method", ["osds", "dis", "scds", "cdds"])
def test_each_method_recovers_a_gaussian(method):
    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, method=method,
                num_samples=2000, num_chains=1, num_iterations=60, consistency_iterations=100, grid_size=16).run()
    assert osds.config.method == method
    assert osds.num_steps == (16 if method == "dis" else 1)
    ev = osds.log_evidence()
    assert ev.num_folded == 0
    assert abs(ev.log_z - LOG_Z) <= Z * ev.se + 0.5 * ev.se**2 + 1e-9, ev
    stats = osds.summary_dict()["x"]
    assert bool(((stats["mean"] - MU).abs() <= Z * SD / math.sqrt(ev.ess)).all()), stats["mean"]
    assert bool(((stats["std"] / SD - 1).abs() <= Z / math.sqrt(2 * ev.ess) + 0.01).all()), stats["std"]


def test_dis_path_weights_are_accurate_at_its_natural_step_count_and_collapse_at_one():
    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("dis", num_iterations=300, grid_size=16, precondition="none", dtype=None)
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    many = sampler.em_evidence(4000, num_steps=16)
    one = sampler.em_evidence(4000, num_steps=1)
    assert abs(many.log_z - LOG_Z) <= Z * many.se + 0.5 * many.se**2, many
    assert many.ess_per_draw > 0.2 and one.ess_per_draw < 0.02 and one.elbo < many.elbo - 1.0


def test_scds_teacher_is_the_current_network():
    config = OSDSConfig.for_method("scds")
    assert config.objective.diffusion.sd_teacher == "current" and config.objective.diffusion.volume_weight == 0.0 and config.objective.diffusion.sd_warmup == 0
    assert config.option("sd_weight") == 1.0 and config.option("diffusion_loss") == "lv"
    pyro.set_rng_seed(0)
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config.replace(num_iterations=3, grid_size=8, dtype=None),
                          disable_progbar=True)
    history = sampler.fit()
    assert all(math.isfinite(v) for v in history["sd_loss"])
    # no volume term and no Jacobian penalty: the distillation loss is the state term alone
    assert history["sd_loss"] == pytest.approx(history["state_loss"], rel=1e-12)


def test_cdds_reproduces_its_teachers_ode_endpoints():
    def skewed(x):
        return batched(x) + 0.3 * torch.nn.functional.softplus(2 * x[:, 0])

    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("cdds", num_iterations=200, consistency_iterations=600, grid_size=16,
                                   precondition="none", dtype=None)
    sampler = FlowSampler(skewed, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    z0 = sampler.process.sample_prior(2000, 3, dtype=D64, generator=torch.Generator().manual_seed(1))
    teacher = sampler.trainers[0].sampling_net
    endpoints = flow(teacher, sampler.whitened_potential, sampler.process, z0, 16, log_det="none").x
    student = consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process, z0, 16.0).f
    untrained = consistency_function(teacher, sampler.whitened_potential, sampler.process, z0, 16.0).f
    rmse = ((student - endpoints) ** 2).mean(0).sqrt()
    spread = endpoints.std(0)
    assert bool((rmse < 0.25 * spread).all()), rmse / spread
    assert bool((rmse < 0.2 * ((untrained - endpoints) ** 2).mean(0).sqrt()).all())


def test_consistency_parameterisation():
    c_skip, c_out = skip_scalings(torch.tensor([0.0, 1.0], dtype=D64), 0.5)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x
    assert float(c_skip[1]) == pytest.approx(0.2) and float(c_out[1]) == pytest.approx(0.5 / math.sqrt(1.25))
    assert consistency_grid(128, 18)[:3] == [0, 8, 15] and consistency_grid(128, 18)[-1] == 128
    assert consistency_grid(8, 18) == list(range(9))
    with pytest.raises(ValueError, match="`consistency_points` must be an integer >= 2"):
        consistency_grid(8, 1)


def test_cdds_one_step_log_det_is_exact():
    pyro.set_rng_seed(0)
    config = OSDSConfig.for_method("cdds", num_iterations=3, consistency_iterations=3, grid_size=8, dtype=None,
                                   precondition="none")
    sampler = FlowSampler(batched, torch.zeros(3, dtype=D64), config, disable_progbar=True)
    sampler.fit()
    with torch.no_grad():
        for p in sampler.sampling_net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    z0 = torch.randn(4, 3, dtype=D64)
    out = consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process, z0, 8.0,
                               log_det=True)
    for i in range(4):
        def f(z, i=i):
            return consistency_function(sampler.sampling_net, sampler.whitened_potential, sampler.process,
                                        z.unsqueeze(0), 8.0).f[0]

        jac = torch.autograd.functional.jacobian(f, z0[i])
        assert float(out.log_det[i]) == pytest.approx(float(torch.linalg.slogdet(jac)[1]), abs=1e-8)


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


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("dis", {"sd_weight": 0.5}, "method='dis' does not use `sd_weight`=0.5"),
        ("dis", {"flow_kl_weight": 1.0}, "method='dis' does not use `flow_kl_weight`"),
        ("scds", {"volume_weight": 0.25}, "method='scds' does not use `volume_weight`"),
        ("scds", {"sd_teacher": "ema"}, "method='scds' does not use `sd_teacher`"),
        ("scds", {"sd_weight": 0.0}, "`sd_weight` must be positive"),
        ("cdds", {"flow_kl_weight": 1.0}, "method='cdds' does not use `flow_kl_weight`"),
        ("dis", {"diffusion_weight": 0.0}, "Nothing to train"),
        ("bogus", {}, "`method` must be one of"),
    ],
)
def test_invalid_method_combinations(method, options, match):
    with pytest.raises(ValueError, match=match):
        OSDS(potential_fn=potential, initial_params={"x": torch.zeros(3)}, method=method, **options)


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
