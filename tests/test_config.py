# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.config: option names and values, presets, estimator options and method combinations."""

import pytest
import torch

from pyro_osds import OSDS, OSDSConfig
from pyro_osds.config import FLAT_OPTIONS
from pyro_osds.ops.reference import ReferenceProcess
from pyro_osds.train import OptimConfig
from tests.common import potential


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


def test_config_validates_the_estimator_options():
    assert OSDSConfig().objective.flow_kl.gradient == "auto"
    with pytest.raises(ValueError, match="flow_kl_gradient"):
        OSDSConfig(flow_kl_gradient="stl")
    with pytest.raises(ValueError, match="path_gradient_cutoff"):
        OSDSConfig(path_gradient_cutoff=0.0)
    assert OSDSConfig(path_gradient_cutoff=None).objective.flow_kl.path_cutoff is None


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


def test_every_flat_option_round_trips_through_the_nested_parts():
    config = OSDSConfig.preset("paper-cpu", grid_size=64, flow_kl_steps=(1, 4), precondition="laplace", chunk_size=7)
    flat = config.as_dict()
    assert list(flat) == ["method", *FLAT_OPTIONS]
    assert OSDSConfig(**flat) == config  # flat -> nested -> flat is the identity
    for name, path in FLAT_OPTIONS.items():
        value = config
        for key in path:
            value = getattr(value, key)
        assert config.option(name) == value == flat[name], name
    assert config.process.grid_size == 64 and config.objective.flow_kl.steps == (1, 4)
    assert config.preconditioner.kind == "laplace" and config.evaluation.chunk_size == 7
    assert config.objective.diffusion.weight == 1.0 and config.optim.sample_with_ema


def test_parts_and_flat_options_combine():
    optim = OptimConfig(num_iterations=12, learning_rate=1e-2)
    config = OSDSConfig(optim=optim, grid_size=8, learning_rate=2e-3)  # flat options apply on top of the parts
    assert config.optim.num_iterations == 12 and config.optim.learning_rate == 2e-3 and config.process.grid_size == 8
    assert OSDSConfig(optim=optim).optim is optim  # a given part is kept as it is
    replaced = config.replace(process=ReferenceProcess(grid_size=16, prior_scale=2.0), num_layers=3)
    assert replaced.process.prior_scale == 2.0 and replaced.net.num_layers == 3 and replaced.optim == config.optim
    with pytest.raises(TypeError, match="`optim` must be a OptimConfig"):
        OSDSConfig(optim={"num_iterations": 3})
    with pytest.raises(TypeError, match="Unknown OSDS option 'learnig_rate'. Did you mean 'learning_rate'"):
        config.replace(learnig_rate=1.0)


def test_each_part_validates_its_own_fields_with_the_flat_name():
    for options, match in [({"sigma_min": 20.0}, "Need `sigma_min` < `sigma_max`"),
                           ({"activation": "tanh"}, "`activation` must be one of"),
                           ({"ema_decay": 1.5}, "`ema_decay` must be <= 1"),
                           ({"flow_kl_batch_size": 1}, "`flow_kl_batch_size` must be an integer >= 2"),
                           ({"consistency_points": 1}, "`consistency_points` must be an integer >= 2"),
                           ({"precondition": "pca"}, "`precondition` must be one of"),
                           ({"eval_num_probes": 0}, "`eval_num_probes` must be an integer >= 1")]:
        with pytest.raises(ValueError, match=match):
            OSDSConfig(**options)
    # the same check when the part is built on its own: one validator, one wording
    with pytest.raises(ValueError, match="Need `sigma_min` < `sigma_max`"):
        ReferenceProcess(sigma_min=20.0)


def test_constraints_across_parts():
    with pytest.raises(ValueError, match="dividing `grid_size`=16"):
        OSDSConfig(grid_size=16, flow_kl_steps=(1, 3))
    with pytest.raises(ValueError, match="even `grid_size`"):
        OSDSConfig(grid_size=9, flow_kl_steps=(1,))
    assert OSDSConfig(grid_size=9, flow_kl_steps=(1, 3), sd_weight=0.0).process.grid_size == 9


def test_flat_options_are_read_by_name_not_as_attributes():
    config = OSDSConfig(num_iterations=7)
    assert config.option("num_iterations") == 7 == config.optim.num_iterations
    with pytest.raises(AttributeError):
        config.num_iterations  # noqa: B018


def test_resolve_is_the_runners_front_door():
    assert OSDSConfig.resolve() == OSDSConfig(num_steps=1)  # the step count of draws is set
    assert OSDSConfig.resolve(preset="smoke", num_iterations=3).optim.num_iterations == 3
    dis = OSDSConfig.resolve(preset="smoke", method="dis")
    assert dis.method == "dis" and dis.objective.diffusion.loss == "lv" and dis.process.grid_size == 16
    assert dis.evaluation.num_steps == 16 == dis.default_num_steps  # the many-step sampler draws on the whole grid
    assert OSDSConfig.resolve(num_steps=4).default_num_steps == 4 and OSDSConfig().default_num_steps == 1
    with pytest.raises(ValueError, match="does not divide the fine grid"):
        OSDSConfig(num_steps=3)
    with pytest.raises(ValueError, match="at most one of `preset` and `config`"):
        OSDSConfig.resolve(preset="smoke", config=OSDSConfig())
