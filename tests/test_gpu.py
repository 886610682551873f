# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
What a GPU user meets, on every device at hand: the CPU always (so that these tests run in CI, which has no GPU),
and ``cuda`` when present. Data on the device (or created there by ``torch.set_default_device``), models with and
without plates, enumerated discrete sites, several modes, several chains, a bare potential, save on the device and
load on the CPU and back, ArviZ data, plots and ``compare`` from the device's draws. The device guard that needs no
GPU is tests/test_devices.py.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS, compare

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMOKE = dict(preset="smoke", disable_progbar=True)


def data(device, n=120, d=4, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n, d, generator=g, device="cpu")
    y = (torch.rand(n, generator=g, device="cpu") < torch.sigmoid(X @ torch.linspace(-1.0, 1.0, d, device="cpu"))).float()
    return X.to(device), y.to(device)


def unplated(X, y=None):  # the usual way: `X @ w` with no plate, its prior built on the data's device
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], device=X.device), 1.0).to_event(1))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)


def plated(X, y=None):
    w = pyro.sample("w", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=X @ w), obs=y)


def default_device_model(X, y=None):  # written for `torch.set_default_device`: no device anywhere
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), torch.ones(X.shape[1])).to_event(1))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)


@pytest.mark.parametrize("device", DEVICES)
def test_a_model_with_data_on_the_device_trains_and_samples_there(device):
    X, y = data(device)
    for model in (unplated, plated):  # vectorised either way: a fallback to the loop would warn (an error here)
        pyro.set_rng_seed(0)
        osds = OSDS(model, num_samples=300, **SMOKE).run(X, y)
        assert osds.target.vectorize in ("vmap", "plate")
        assert all(s.device.type == device for s in osds.samplers)
        assert osds.get_samples()["w"].device.type == device
        ev = osds.log_evidence()
        assert math.isfinite(ev.log_z) and ev.num_folded == 0
        assert osds.to_datatree()["posterior"]["w"].shape == (2, 300, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("default", ["data", "cpu"])
def test_set_default_device_puts_the_whole_run_there(device, default):
    # default "data": the model makes its tensors with no device (`torch.set_default_device(device)`); "cpu": the
    # default device is the CPU's, explicitly, and the data elsewhere (on an H100 the package's `torch.as_tensor`
    # calls moved the GPU's data to the CPU so)
    torch.set_default_device(device if default == "data" else "cpu")
    try:
        X, y = data(device)
        pyro.set_rng_seed(0)
        osds = OSDS(default_device_model if default == "data" else plated, num_samples=200, num_chains=1,
                    **SMOKE).run(X, y)
        assert osds.samplers[0].device.type == device and math.isfinite(osds.log_evidence().log_z)
        assert osds.get_samples()["w"].shape == (200, 4) and osds.get_samples()["w"].device.type == device
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("device", DEVICES)
def test_enumerated_discrete_sites_on_the_device(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    y = torch.cat([torch.randn(15, generator=g, device="cpu") - 2.0, torch.randn(15, generator=g, device="cpu") + 2.0])
    y = y.to(device)

    def mixture(y):
        locs = pyro.sample("locs", dist.Normal(y.new_tensor([-1.0, 1.0]), 2.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            k = pyro.sample("k", dist.Categorical(y.new_tensor([0.5, 0.5])), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[k], 1.0), obs=y)

    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the label-switching modes are reported
        osds = OSDS(mixture, num_samples=100, mode_search_starts=0, **SMOKE).run(y)
    samples = osds.get_samples()
    assert samples["k"].shape == (200, 30) and samples["locs"].device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_several_modes_on_the_device(device):
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], device=device)
    log_weights = torch.tensor([0.3, 0.7], device=device).log()

    def two_modes(params):  # a bare potential on the device; log Z = 0
        comp = torch.distributions.Normal(centres, 0.7).log_prob(params["x"].unsqueeze(-2)).sum(-1)
        return -torch.logsumexp(comp + log_weights, -1)

    pyro.set_rng_seed(0)
    osds = OSDS(potential_fn=two_modes, initial_params={"x": torch.zeros(2, device=device)}, batched_potential=True,
                num_samples=400, num_iterations=10, disable_progbar=True).run()
    assert len(osds.samplers[0].components) == 2 and osds.draws[0].x.device.type == device
    ev = osds.log_evidence()
    assert abs(ev.log_z) < 0.1 and ev.num_lost_modes == 0

    def wells(params):  # 2^10 modes: the marginal-mixture preconditioner
        x = params["x"]
        return -torch.logaddexp(-0.5 * (x + 3.5) ** 2 + math.log(0.25), -0.5 * (x - 3.5) ** 2 + math.log(0.75)).sum(-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the mode search says it found too many modes
        many = OSDS(potential_fn=wells, initial_params={"x": torch.zeros(10, device=device)}, batched_potential=True,
                    num_samples=200, num_chains=1, num_iterations=5, disable_progbar=True).run()
    assert many.samplers[0].report.marginal_mixture and many.draws[0].x.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_save_on_the_device_load_on_the_cpu_and_back(device, tmp_path):
    X, y = data(device)
    pyro.set_rng_seed(0)
    osds = OSDS(plated, num_samples=100, **SMOKE).run(X, y)
    osds.save(tmp_path / "run.pt")
    on_cpu = OSDS.load(tmp_path / "run.pt", plated, device="cpu")
    assert on_cpu.samplers[0].device.type == "cpu" and on_cpu.draws[0].x.device.type == "cpu"
    assert on_cpu.log_evidence().log_z == osds.log_evidence().log_z
    on_cpu.sample(50)
    on_cpu.save(tmp_path / "cpu.pt")
    back = OSDS.load(tmp_path / "cpu.pt", plated, device=device)
    assert back.samplers[0].device.type == device and back.get_samples()["w"].device.type == device
    back.continue_training(back.config.optim.num_iterations + 2).sample(50)
    assert math.isfinite(back.log_evidence().log_z)


@pytest.mark.parametrize("device", DEVICES)
def test_arviz_plots_and_compare_from_the_devices_draws(device):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    X, y = data(device)
    runs = {}
    for name, features in (("all", 4), ("two", 2)):
        pyro.set_rng_seed(0)
        runs[name] = OSDS(plated, num_samples=150, **SMOKE).run(X[:, :features], y)
    dt = runs["all"].to_datatree(posterior_predictive=runs["all"].predictive())
    assert dt["posterior_predictive"]["obs"].shape == (2, 150, 120)
    runs["all"].plot_training()
    runs["all"].plot_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # smoke-trained samplers: the tail read from 16384 draws is heavy
        table = compare(runs)
    assert set(table.index) == {"all", "two"}
    matplotlib.pyplot.close("all")
