# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.samplers.exact: a model with nothing to sample (a fixed "null" model, or one whose latent
sites are all enumerated) has its exact log Z, SE 0, empty posterior draws, and takes part in compare()."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_osds import OSDS, compare
from pyro_osds.samplers import ExactChain

D64 = torch.float64
Y = torch.randn(9, dtype=D64, generator=torch.Generator().manual_seed(0)) + 0.6


def null(y):  # y ~ N(0, 1): no parameter
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(y.new_tensor(0.0), 1.0), obs=y)


def shifted(y):  # y ~ N(mu, 1), mu ~ N(0, 1): log Z is that of N(0, I + 1 1^T)
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def two_groups(y):  # every point from one of two known Gaussians: the assignments enumerated, nothing continuous
    with pyro.plate("data", y.shape[0]):
        k = pyro.sample("k", dist.Categorical(y.new_tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(y.new_tensor([-1.0, 1.0])[k], 1.0), obs=y)


def test_a_null_model_has_its_log_likelihood_as_exact_log_z(capsys):
    osds = OSDS(null, num_samples=50, disable_progbar=True).run(Y)
    ev = osds.log_evidence()
    assert ev.log_z == pytest.approx(float(dist.Normal(0.0, 1.0).log_prob(Y).sum()), abs=1e-12)
    assert ev.se == 0.0 and ev.reliable and ev.ess == 100
    assert all(isinstance(s, ExactChain) and s.iteration == 0 for s in osds.samplers)
    assert osds.get_samples() == {} and osds.draws[0].x.shape == (50, 0)
    osds.summary()
    assert "log Z = " in capsys.readouterr().out
    tree = osds.to_datatree()
    assert dict(tree["posterior"].sizes) == {"chain": 2, "draw": 50} and not tree["posterior"].data_vars
    assert tree["log_likelihood"]["y"].shape == (2, 50, 9)


def test_a_null_model_takes_part_in_model_comparison():
    pyro.set_rng_seed(0)
    alternative = OSDS(shifted, num_samples=2000, disable_progbar=True).run(Y)
    cov = torch.eye(9, dtype=D64) + torch.ones(9, 9, dtype=D64)
    exact = float(dist.MultivariateNormal(torch.zeros(9, dtype=D64), cov).log_prob(Y))
    assert alternative.log_evidence().log_z == pytest.approx(exact, abs=5 * alternative.log_evidence().se + 1e-6)
    table = compare({"null": OSDS(null, num_samples=10, disable_progbar=True).run(Y), "shifted": alternative})
    log_bf = exact - float(dist.Normal(0.0, 1.0).log_prob(Y).sum())
    assert table.loc["null", "log_z"] == pytest.approx(exact - log_bf, abs=1e-12)
    assert table.index[0] == ("shifted" if log_bf > 0 else "null")


def test_enumerated_sites_alone_give_the_exact_marginal_likelihood_and_their_draws():
    osds = OSDS(two_groups, num_samples=40, disable_progbar=True).run(Y)
    components = torch.stack([dist.Normal(-1.0, 1.0).log_prob(Y) + math.log(0.3),
                              dist.Normal(1.0, 1.0).log_prob(Y) + math.log(0.7)])
    assert osds.log_evidence().log_z == pytest.approx(float(torch.logsumexp(components, 0).sum()), abs=1e-10)
    k = osds.get_samples()["k"]
    assert k.shape == (80, 9) and set(k.unique().tolist()) <= {0, 1}


def test_a_null_model_saves_and_loads(tmp_path):
    osds = OSDS(null, num_samples=20, disable_progbar=True).run(Y)
    osds.save(tmp_path / "null.pt")
    loaded = OSDS.load(tmp_path / "null.pt", null)
    assert loaded.log_evidence() == osds.log_evidence()
    assert loaded.sample(5).log_evidence().log_z == osds.log_evidence().log_z
