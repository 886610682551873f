# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.inputs: a model's bad data and what OSDS cannot sample are refused before any training, by
a ValueError that names the site, what was found and the fix (each class of mistake, twice)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_osds import OSDS, UnsupportedModelError
from pyro_osds.inputs import check_model

D64 = torch.float64


def regression(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def classifier(X, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=X @ w), obs=y)


def counts(y):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Poisson(rate), obs=y)


def correlated(y):  # 2-D observations
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.MultivariateNormal(loc, torch.eye(2)), obs=y)


X = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))


def refused(model, *args, error=ValueError, match):
    """The runner refuses ``model(*args)`` when it builds the target, before training (``fit`` trains nothing)."""
    runner = OSDS(model, num_iterations=1, disable_progbar=True)
    with pytest.raises(error, match=match):
        runner.setup(*args)
    assert not runner.samplers


def test_data_whose_shape_does_not_fit_its_site_are_refused_naming_it():
    refused(regression, X, torch.zeros(6, 2), match=r"Observed site 'y': its data have shape \(6, 2\), which does "
            r"not broadcast with its distribution's shape \(6,\).*plates 'data' \(size 6, dim -1\)")
    refused(correlated, torch.zeros(5, 3), match=r"Observed site 'y'.*shape \(5, 3\).*\(5, 2\).*event shape \(2,\)")


def test_non_finite_data_are_refused_with_the_first_index():
    y = torch.zeros(6)
    y[4] = math.nan
    refused(regression, X, y, match=r"Observed site 'y' holds 1 non-finite value\(s\) \(the first, nan, at index "
            r"\(4,\)\).*poutine.mask")
    refused(counts, torch.tensor([1.0, math.inf, 3.0]), match=r"'y' holds 1 non-finite .*inf, at index \(1,\)")
    # a NaN in a covariate (no site holds it): the potential is nowhere finite, and the message names the argument
    bad_x = X.clone()
    bad_x[2, 1] = math.nan
    refused(regression, bad_x, torch.zeros(6), match=r"argument 0 \(1 non-finite, the first at index \(2, 1\)\)")


def test_non_finite_data_left_out_by_a_mask_are_fine():
    def masked(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", y.shape[0]), poutine.mask(mask=torch.isfinite(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    trace = check_model(masked, (torch.tensor([0.1, math.nan, 0.3]),), {})
    assert "y" in trace.nodes


def test_data_of_a_dtype_the_distribution_refuses_are_refused_with_the_fix():
    labels = (X[:, 0] > 0).to(torch.int64)
    refused(classifier, X, labels, match=r"Observed site 'y': its data are torch.int64, which Bernoulli.log_prob "
            r"cannot take.*`y.float\(\)`")
    refused(classifier, X, labels.bool(), match=r"its data are torch.bool.*Pass floating-point data")


def test_data_outside_the_support_are_refused():
    refused(classifier, X, torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 1.0]),
            match=r"'y' holds 1 value\(s\) outside the support of its distribution \(Bernoulli.*e.g. 2.0 at index \(2,\)")
    refused(counts, torch.tensor([3.0, -1.0, 0.0]), match=r"outside the support .*Poisson.*e.g. -1.0 at index \(1,\)")


def test_improper_priors_are_refused_as_such():
    def flat(y):
        x = pyro.sample("x", dist.ImproperUniform(dist.constraints.real, (), ()))
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    def masked_prior(y):  # Pyro's idiom for a flat prior
        x = pyro.sample("x", dist.Normal(0.0, 1.0).mask(False))
        pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    y = torch.tensor(0.3)
    refused(flat, y, error=UnsupportedModelError, match=r"Latent site 'x' has an improper prior \(ImproperUniform\): "
            r"the evidence of a model with an improper prior is undefined")
    refused(masked_prior, y, error=UnsupportedModelError, match=r"Latent site 'x' has a masked .*improper")


def test_good_data_pass_and_cost_one_trace():
    calls = []

    def counted(X, y):
        calls.append(1)
        regression(X, y)

    trace = check_model(counted, (X, torch.zeros(6)), {})
    assert len(calls) == 1 and trace.nodes["y"]["is_observed"]


MIX_WEIGHTS, MIX_LOCS, MIX_SCALE = torch.tensor([0.3, 0.7], dtype=D64), torch.tensor([-2.0, 2.0], dtype=D64), 0.5
MIX_DATA = torch.tensor([0.5, 1.0, -0.2], dtype=D64)


def mixture_prior(y):
    """A latent site drawn from a MixtureSameFamily, whose support torch has no bijection for (and a positive scale,
    whose transform the user does not give)."""
    mixing = dist.Categorical(MIX_WEIGHTS)
    mu = pyro.sample("mu", dist.MixtureSameFamily(mixing, dist.Normal(MIX_LOCS, MIX_SCALE)))
    noise = pyro.sample("noise", dist.LogNormal(torch.tensor(0.0, dtype=D64), 0.25))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, noise), obs=y)


def test_a_support_without_a_registered_bijection_is_refused_naming_the_site_and_the_fix():
    with pytest.raises(UnsupportedModelError, match="Latent site 'mu' \\(MixtureSameFamily\\).*transforms=\\{'mu'"
                                                    ".*identity_transform"):
        OSDS(mixture_prior, preset="smoke", disable_progbar=True).run(MIX_DATA)
    trace = check_model(mixture_prior, (MIX_DATA,), {}, {"mu": torch.distributions.transforms.identity_transform})
    assert "mu" in trace.nodes


def test_the_mixture_prior_with_the_transform_given_gives_the_exact_evidence():
    """Statistical: y | mu, noise ~ N(mu, noise^2), mu from a two-component Normal mixture, noise log-normal (its
    transform made as Pyro would): exact log Z = log of the integral over log noise (quadrature) of the logsumexp
    over the components of log w_k + log N(y; m_k 1, noise^2 I + s^2 1 1^T). Tolerance 4 SE + 0.01."""
    pyro.set_rng_seed(0)
    osds = OSDS(mixture_prior, num_samples=1000, disable_progbar=True,
                transforms={"mu": torch.distributions.transforms.identity_transform}).run(MIX_DATA)
    assert (osds.get_samples()["noise"] > 0).all()
    n = MIX_DATA.shape[0]
    v = torch.linspace(-2.0, 2.0, 4001, dtype=D64)  # log noise, prior N(0, 0.25^2)
    cov = v.exp()[:, None, None] ** 2 * torch.eye(n, dtype=D64) + MIX_SCALE**2 * torch.ones(n, n, dtype=D64)
    terms = torch.stack([math.log(float(w)) + dist.MultivariateNormal(m * torch.ones(n, dtype=D64), cov)
                         .log_prob(MIX_DATA) for w, m in zip(MIX_WEIGHTS, MIX_LOCS, strict=True)])
    log_f = torch.logsumexp(terms, 0) + dist.Normal(torch.tensor(0.0, dtype=D64), 0.25).log_prob(v)
    top = log_f.max()
    truth = float(top + torch.log(torch.trapezoid((log_f - top).exp(), v)))
    ev = osds.log_evidence()
    assert abs(ev.log_z - truth) < 4 * ev.se + 0.01, (ev.log_z, truth, ev.se)


def point_mass(y, event=False):
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0, dtype=D64), 1.0))
    fn = dist.Delta(a.expand(2)).to_event(1) if event else dist.Delta(a)
    b = pyro.sample("b", fn)
    pyro.sample("y", dist.Normal(b.sum(), 1.0), obs=y)


@pytest.mark.parametrize("event", [False, True])
def test_a_latent_point_mass_is_refused_naming_the_site_and_pyro_deterministic(event):
    """A latent Delta has no density (the potential is infinite almost everywhere): refused before any initial point
    is tried, naming the site and `pyro.deterministic`, instead of 'NaN or infinite at every initial point'."""
    with pytest.raises(UnsupportedModelError, match="Latent site 'b' is a Delta.*pyro.deterministic\\('b', value\\)"):
        OSDS(point_mass, preset="smoke", disable_progbar=True).run(torch.tensor(0.3, dtype=D64), event=event)
    observed = poutine.condition(point_mass, data={"b": torch.tensor(0.1, dtype=D64)})
    assert "b" in check_model(observed, (torch.tensor(0.3, dtype=D64),), {}).nodes  # observed: a likelihood term
