# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Tutorial 1: Bayesian logistic regression on the UCI Ionosphere data, OSDS next to NUTS
======================================================================================

Run it with ``python tutorials/01_logistic_regression.py`` (a few minutes on a 2-core CPU);
``OSDS_SMOKE_TEST=1`` (or ``CI=1``) runs a seconds-long version. Figures go to
``tutorials/_outputs/``.

What it shows:

1. ``OSDS(model).run(X, y)`` as a drop-in for ``MCMC(NUTS(model)).run(X, y)``;
2. the log evidence ``log Z = log p(y | X)`` with its standard error, ELBO, ESS and Pareto k-hat;
3. the posterior means and standard deviations of both samplers side by side;
4. the training curves and the weights (``plot_training``, ``plot_weights``), ArviZ on the results
   (``az.summary``, ``az.plot_posterior``), and fresh draws with more flow steps.
"""

# %% Set-up
import os
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from pyro_osds import OSDS
from pyro_osds.datasets import load_ionosphere

SMOKE = bool(os.environ.get("OSDS_SMOKE_TEST")) or "CI" in os.environ
OUT = Path(__file__).parent / "_outputs" if "__file__" in globals() else Path("_outputs")  # script / notebook
OUT.mkdir(exist_ok=True)
torch.set_num_threads(1)  # on a shared 2-core machine one thread is fastest and never stalls
pyro.set_rng_seed(0)

# %% Data: 351 radar returns, 34 features (standardised) + an intercept; y = 1 for "good" returns
X, y = load_ionosphere(dtype=torch.float64)
print(f"Ionosphere: X {tuple(X.shape)}, {int(y.sum())} positive labels")


# %% The model, exactly as one would write it for NUTS
def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)


# %% OSDS: train two independent one-step samplers, then draw with a single flow step
start = time.perf_counter()
osds = OSDS(model, num_samples=2000, num_chains=2, preset="smoke" if SMOKE else None).run(X, y)
osds_seconds = time.perf_counter() - start
evidence = osds.log_evidence()
print(f"\nOSDS: {osds_seconds:.1f} s (training two chains + 4000 draws with exact weights)")
print(evidence)

# %% NUTS with the usual settings
start = time.perf_counter()
mcmc = MCMC(NUTS(model), num_samples=20 if SMOKE else 1000, warmup_steps=20 if SMOKE else 500,
            disable_progbar=SMOKE)
mcmc.run(X, y)
nuts_seconds = time.perf_counter() - start
print(f"\nNUTS: {nuts_seconds:.1f} s")

# %% Posterior means and standard deviations side by side (OSDS importance-weighted)
nuts_w = mcmc.get_samples()["w"]
nuts_mean, nuts_sd = nuts_w.mean(0), nuts_w.std(0)
stats = osds.summary_dict()["w"]
diff = (stats["mean"] - nuts_mean).abs() / nuts_sd
print("\n  weight   OSDS mean (sd)     NUTS mean (sd)")
for i in range(0, X.shape[1], 5 if not SMOKE else 17):
    print(f"  w[{i:2d}]  {float(stats['mean'][i]):7.3f} ({float(stats['std'][i]):.3f})   "
          f"{float(nuts_mean[i]):7.3f} ({float(nuts_sd[i]):.3f})")
print(f"largest |mean difference| / NUTS sd over all {X.shape[1]} weights: {float(diff.max()):.3f}")
print(f"sd ratio OSDS/NUTS: {float((stats['std'] / nuts_sd).min()):.3f} .. {float((stats['std'] / nuts_sd).max()):.3f}")

# %% How training went, and what the weights say: the loss, ELBO and ESS/N of the training draws per chain,
# and each chain's log-weights relative to their mean (a long right tail = a few draws dominate; k-hat says
# how heavy that tail is)
import matplotlib  # noqa: E402

matplotlib.use("Agg")
axes = osds.plot_training()
axes[0].figure.tight_layout()
axes[0].figure.savefig(OUT / "01_training.png", dpi=80)
axes = osds.plot_weights()
axes[0].figure.tight_layout()
axes[0].figure.savefig(OUT / "01_weights.png", dpi=80)
print(f"saved {OUT / '01_training.png'} and {OUT / '01_weights.png'}")

# %% ArviZ. The posterior group holds equally weighted draws (the weighted draws resampled per chain), so
# ArviZ's summary, HDI and plots estimate the posterior; the raw draws and their log-weights are in
# `weighted_posterior` / `weighted_sample_stats`.
try:
    import arviz as az
    import pandas as pd

    idata = osds.to_inference_data()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(az.summary(idata, var_names=["w"], coords={"w_dim_0": [0, 1, 2, 3]}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ 0.x plotting deprecations
        axes = az.plot_posterior(idata, var_names=["w"], coords={"w_dim_0": [1, 3, 5]})
    axes.ravel()[0].figure.savefig(OUT / "01_posterior.png", dpi=80)
    print(f"saved {OUT / '01_posterior.png'}")
except ImportError:  # ArviZ is optional at run time
    print(osds.to_datatree())

# %% More flow steps. The default objective trains the one-step map only: the 2- and 4-step maps of
# the same network are untrained. OSDS warns about that, and counts the draws where such a map folds
# (its weights are not exact there; `compare` marks such estimates unreliable). To sample with K
# steps, train them: `OSDS(model, num_steps=4)`.
import warnings  # noqa: E402

for steps in (1, 2, 4):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained-map and fold warnings, summarised below
        ev = osds.sample(2000, num_steps=steps).log_evidence()
    if ev.reliable:
        verdict = "estimate reliable"
    elif steps > 1:
        verdict = "flagged, as expected of an untrained map (folded draws or k_hat > 0.5; train it to use it)"
    else:
        verdict = "flagged: k_hat > 0.5, the SE understates the error (train longer or draw more)"
    print(f"K = {steps}: log Z = {ev.log_z:.3f} +- {ev.se:.3f}, ESS/N = {ev.ess_per_draw:.3f}, "
          f"k_hat = {ev.k_hat:.2f}, folded draws = {ev.num_folded}: {verdict}")
