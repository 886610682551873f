# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.plots: the training curves and the weights' histogram draw what the runner recorded."""

import math

import matplotlib
import numpy as np
import pytest
import torch

from pyro_osds import OSDS
from pyro_osds.plots import training_histories
from tests.common import D64, fitted_module_osds, mixture_potential

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(scope="module")
def osds():
    return fitted_module_osds()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_training_curves_are_the_histories(osds):
    axes = osds.plot_training(smooth=1)
    assert len(axes) == 3
    histories = training_histories(osds)
    assert len(histories) == 2 and all(set(h) == {""} for h in histories)
    for ax, key in zip(axes, ("loss", "elbo", "flow_kl_ess"), strict=True):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["chain 0", "chain 1"]
        for chain, line in enumerate(lines):
            np.testing.assert_allclose(line.get_ydata(), histories[chain][""][key])


def test_running_mean_smooths_over_its_window(osds):
    ax = osds.plot_training(panels=("loss",), smooth=10)[0]
    raw = torch.tensor(training_histories(osds)[0][""]["loss"], dtype=torch.float64)
    y = ax.get_lines()[0].get_ydata()
    assert y[25] == pytest.approx(float(raw[16:26].mean())) and y[0] == pytest.approx(float(raw[0]))


def test_plot_arguments_are_checked(osds):
    with pytest.raises(ValueError, match="panels"):
        osds.plot_training(panels=("grad",))
    with pytest.raises(ValueError, match="smooth"):
        osds.plot_training(smooth=0)
    _, axes = plt.subplots(1, 2)
    with pytest.raises(ValueError, match="one axis per panel"):
        osds.plot_training(axes=axes)
    _, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="one axis per chain"):
        osds.plot_weights(axes=axes)
    with pytest.raises(RuntimeError, match="Call `run"):
        OSDS(potential_fn=lambda p: (p["x"] ** 2).sum(), initial_params={"x": torch.zeros(2)}).plot_training()


def test_weight_histograms_show_each_chains_weights_and_k_hat(osds):
    axes = osds.plot_weights(bins=20)
    ev = osds.log_evidence()
    assert len(axes) == 2
    for chain, ax in enumerate(axes):
        counts = [patch.get_height() for patch in ax.patches]
        assert len(counts) == 20 and sum(counts) == len(osds.draws[chain].log_weight)
        assert f"{ev.chains[chain].k_hat:.2f}" in ax.get_title() and "ESS/N" in ax.get_title()
        # the weights relative to their mean: the mean of exp(value) over the draws is 1
        edges = np.array([patch.get_x() for patch in ax.patches] + [ax.patches[-1].get_x() + ax.patches[-1].get_width()])
        log_w = osds.draws[chain].log_weight
        relative = log_w - (torch.logsumexp(log_w, 0) - math.log(len(log_w)))
        assert edges[0] == pytest.approx(float(relative.min())) and edges[-1] == pytest.approx(float(relative.max()))


def test_mixture_components_get_their_own_curves(tmp_path):
    def potential(p):
        return mixture_potential(p["x"])

    osds = OSDS(potential_fn=potential, initial_params={"x": torch.zeros(2, dtype=D64)}, batched_potential=True,
                num_samples=200, num_iterations=40, num_chains=1, early_stopping=False, disable_progbar=True).run()
    labels = [line.get_label() for line in osds.plot_training(panels=("loss",))[0].get_lines()]
    trained = list(training_histories(osds)[0])
    assert trained == ["component 0", "component 1"]  # early stopping off: both train their 40 iterations
    assert labels == ["chain 0 component 0", "chain 0 component 1"]
    fig = osds.plot_weights()[0].figure
    fig.savefig(tmp_path / "weights.png")
    assert (tmp_path / "weights.png").stat().st_size > 0
