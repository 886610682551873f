# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Tutorial 2: comparing competing Pyro models by Bayes factors
============================================================

Run it with ``python tutorials/02_model_comparison.py``; ``OSDS_SMOKE_TEST=1`` runs a quick version.

Three logistic regressions for the Ionosphere labels, nested in their features:

* ``intercept``: only an intercept (1 parameter);
* ``first_ten``: intercept + the first ten radar features (11 parameters);
* ``all``: intercept + all 34 features (35 parameters).

``pyro_osds.compare`` turns each model's log evidence ``log p(y | model)`` into log Bayes factors with
standard errors and posterior model probabilities. The intercept-only model has a one-dimensional
posterior, so its log evidence is checked against quadrature. For contrast, ArviZ's LOO compares the
same fits by predictive accuracy instead of evidence.
"""

# %% Set-up
import math
import os

import pyro
import pyro.distributions as dist
import torch

from pyro_osds import OSDS, compare
from pyro_osds.datasets import load_ionosphere

SMOKE = bool(os.environ.get("OSDS_SMOKE_TEST")) or "CI" in os.environ
torch.set_num_threads(1)
pyro.set_rng_seed(0)
D64 = torch.float64
X, y = load_ionosphere(dtype=D64)


def logistic(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), 1.0).to_event(1))
    pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)


designs = {"intercept": X[:, :1], "first_ten": X[:, :11], "all": X}

# %% Fit each model (same model code, different design matrices)
options = dict(num_samples=2000, preset="smoke") if SMOKE else dict(num_samples=4000)
fits = {name: OSDS(logistic, **options).run(design, y) for name, design in designs.items()}
for name, fit in fits.items():
    print(f"{name:>10}: {fit.log_evidence()}")

# %% Check the one-dimensional model against quadrature
w = torch.linspace(-8, 8, 200_001, dtype=D64)
log_joint = dist.Normal(torch.tensor(0.0, dtype=D64), 1.0).log_prob(w) + (
    y * torch.nn.functional.logsigmoid(w[:, None]) + (1 - y) * torch.nn.functional.logsigmoid(-w[:, None])
).sum(-1)
exact = float(torch.logsumexp(log_joint, 0) + math.log(float(w[1] - w[0])))
ev = fits["intercept"].log_evidence()
print(f"\nintercept-only: OSDS log Z = {ev.log_z:.4f} +- {ev.se:.4f}, quadrature {exact:.4f} "
      f"({(ev.log_z - exact) / max(ev.se, 1e-12):+.1f} SE)")

# %% Bayes factors
table = compare(fits)
print(table.to_string(float_format=lambda v: f"{v:.3f}"))
best = table.index[0]
for name in table.index[1:]:
    print(f"log BF({best} : {name}) = {-table.loc[name, 'log_bf']:.2f} +- {table.loc[name, 'log_bf_se']:.2f}")

# %% For contrast: predictive comparison with PSIS-LOO
try:
    import arviz as az

    if int(az.__version__.split(".")[0]) < 1:
        print(az.compare({name: fit.to_inference_data() for name, fit in fits.items()}))
except ImportError:
    pass
