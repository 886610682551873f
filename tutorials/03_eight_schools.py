# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Tutorial 3: a hierarchical model with a constrained scale, the eight schools (Rubin 1981)
=========================================================================================

Run it with ``python tutorials/03_eight_schools.py``; ``OSDS_SMOKE_TEST=1`` runs a quick version.

What it shows:

1. a model with a positive scale ``tau`` (sampled in log space by OSDS, returned on its support);
2. the centred and the non-centred parameterisations describe the same joint distribution of the data,
   so their log evidences must agree (a free consistency check of the estimator); OSDS itself draws the
   centred model's ``theta`` in non-centred form when that form's mean-field ELBO is higher
   (``noncentering="auto"``, the default; ``"none"`` keeps the model as written), and reports ``theta``;
   given ``tau`` the model is Gaussian in ``mu`` and ``theta``, so OSDS also draws those sites whitened by their
   exact conditional (``whitening="auto"``), leaving only ``tau``'s marginal to learn;
3. an exact reference: given ``tau`` the model is Gaussian, so ``log p(y)`` is a one-dimensional integral
   over ``tau`` that quadrature computes to high accuracy;
4. the Bayes factor of the hierarchical model against complete pooling (``tau = 0``).
"""

# %% Set-up
import math
import os

import pyro
import pyro.distributions as dist
import torch

from pyro_osds import OSDS, compare

SMOKE = bool(os.environ.get("OSDS_SMOKE_TEST")) or "CI" in os.environ
torch.set_num_threads(1)
pyro.set_rng_seed(0)
D64 = torch.float64

y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=D64)
sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=D64)


# %% Three models
def centered(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=D64)))
    with pyro.plate("schools", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def non_centered(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=D64)))
    with pyro.plate("schools", y.shape[0]):
        eta = pyro.sample("eta", dist.Normal(torch.tensor(0.0, dtype=D64), 1.0))
        theta = pyro.deterministic("theta", mu + tau * eta)  # reported with the posterior
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def complete_pooling(y, sigma):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
    with pyro.plate("schools", y.shape[0]):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)


# %% Exact log evidences
def gaussian_log_z(tau):
    """log p(y | tau): y ~ N(0, diag(sigma^2 + tau^2) + 25 * 11^T) after integrating out mu and theta."""
    cov = torch.diag(sigma**2 + tau**2) + 25.0 * torch.ones(8, 8, dtype=D64)
    return torch.distributions.MultivariateNormal(torch.zeros(8, dtype=D64), cov).log_prob(y)


# log p(y) = log int_0^inf HalfCauchy(tau; 5) p(y | tau) dtau, with tau = exp(s) on a fine grid
s = torch.linspace(-12.0, 9.0, 20_001, dtype=D64)
tau = s.exp()
log_integrand = torch.stack([gaussian_log_z(t) for t in tau]) + dist.HalfCauchy(torch.tensor(5.0, dtype=D64)).log_prob(tau) + s
exact_hierarchical = float(torch.logsumexp(log_integrand, 0) + math.log(float(s[1] - s[0])))
exact_pooled = float(gaussian_log_z(torch.tensor(0.0, dtype=D64)))
print(f"exact log Z: hierarchical {exact_hierarchical:.4f}, complete pooling {exact_pooled:.4f}")

# %% OSDS on all three
options = dict(num_samples=2000, preset="smoke") if SMOKE else dict(num_samples=4000)
fits = {}
for name, model in [("centered", centered), ("non_centered", non_centered), ("complete_pooling", complete_pooling)]:
    fits[name] = OSDS(model, **options).run(y, sigma)
    print(f"\n{name}:\n{fits[name].log_evidence()}")

# %% The two parameterisations agree with each other and with the quadrature. The centred model was drawn
# non-centred (its own choice), its ``theta`` computed from the standardised draws ``theta_decentered``, and the
# sites that are Gaussian given ``tau`` whitened by their exact conditional.
print(f"sites OSDS non-centred in the centred model: {fits['centered'].target.noncentered_sites}")
print(f"sites OSDS whitened given the others: {fits['centered'].target.whitened_sites}")
for name in ("centered", "non_centered"):
    ev = fits[name].log_evidence()
    print(f"{name:>13}: log Z = {ev.log_z:.3f} +- {ev.se:.3f} (exact {exact_hierarchical:.3f}, "
          f"error {ev.log_z - exact_hierarchical:+.3f} = {(ev.log_z - exact_hierarchical) / ev.se:+.1f} SE)")
ev = fits["complete_pooling"].log_evidence()
print(f"complete pooling: log Z = {ev.log_z:.3f} +- {ev.se:.3f} (exact {exact_pooled:.3f})")

# %% Bayes factors
print(compare({"hierarchical (non-centred)": fits["non_centered"], "complete pooling": fits["complete_pooling"]}))
print(f"exact log Bayes factor, pooling vs hierarchical: {exact_pooled - exact_hierarchical:.3f}")

# %% The scale's posterior, on its support
fits["non_centered"].summary()
tau_draws = fits["non_centered"].get_samples()["tau"]
print(f"tau > 0 for all draws: {bool((tau_draws > 0).all())}; posterior median of tau: {float(tau_draws.median()):.2f}")

# %% Posterior predictive check: replicated data at every posterior draw. The observed spread of the schools'
# effects (max - min = 31) is no surprise to the hierarchical model: the share of replications at least as
# spread out is a posterior predictive p-value, far from 0 and 1.
fit = fits["non_centered"]
replicated = fit.predictive()["obs"]  # (chains * draws, 8), lined up with the posterior draws
spread = replicated.max(-1).values - replicated.min(-1).values
print(f"P(spread of replicated effects >= observed {float(y.max() - y.min()):.0f}) = "
      f"{float((spread >= y.max() - y.min()).double().mean()):.2f}")
try:
    import arviz as az

    idata = fit.to_inference_data(posterior_predictive={"obs": replicated})
    print(az.summary(idata, var_names=["theta"], kind="stats"))  # the deterministic school effects
except ImportError:  # ArviZ is optional at run time
    pass
