# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Tutorial 4: a Gaussian mixture model, whose posterior has one mode per labelling of its components
==================================================================================================

Run it with ``python tutorials/04_mixture_model.py``; ``OSDS_SMOKE_TEST=1`` runs a quick version.

What it shows:

1. a mixture model written as a Pyro user writes it, with the assignments ``z`` as enumerated discrete
   sites and ``Vindex`` indexing; OSDS marginalises ``z`` exactly, as NUTS does;
2. label switching: swapping the two components' labels leaves the posterior unchanged, so it has two
   symmetric modes. Each chain's mode search finds both and the chain becomes a mixture with one
   component per mode; ``log_evidence()`` lists the components, and the modes come out with half the
   mass each (a sampler that kept one labelling would be log 2 = 0.69 nats low);
3. an exact reference: given the assignments the model is conjugate, so ``log p(y)`` is a sum over all
   2^n assignments;
4. the Bayes factor of two components against one.
"""

# %% Set-up
import math
import os

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex

from pyro_osds import OSDS, compare

SMOKE = bool(os.environ.get("OSDS_SMOKE_TEST")) or "CI" in os.environ
torch.set_num_threads(1)
pyro.set_rng_seed(0)
D64 = torch.float64
SIGMA, TAU = 1.0, 4.0  # known component sd, prior sd of the component means

y = torch.tensor([-2.3, -1.9, -2.6, -2.0, 2.1, 2.4, 1.8, 2.2], dtype=D64)


# %% The models
def two_components(y):
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2, dtype=D64), TAU).to_event(1))
    with pyro.plate("data", len(y)):
        z = pyro.sample("z", dist.Categorical(torch.full((2,), 0.5, dtype=D64)))
        pyro.sample("obs", dist.Normal(Vindex(locs)[..., z], SIGMA), obs=y)


def one_component(y):
    loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0, dtype=D64), TAU))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(loc, SIGMA), obs=y)


# %% Exact log evidence: sum the conjugate marginal likelihood over every assignment
def exact_log_z(y, num_components):
    n = len(y)
    assignments = torch.cartesian_prod(*[torch.arange(num_components)] * n)
    one_hot = torch.nn.functional.one_hot(assignments, num_components).to(D64)
    counts, sums = one_hot.sum(1), (one_hot * y[None, :, None]).sum(1)
    squares = (one_hot * (y**2)[None, :, None]).sum(1)
    precision = 1 / TAU**2 + counts / SIGMA**2
    log_marginal = (-0.5 * counts * math.log(2 * math.pi * SIGMA**2) - 0.5 * torch.log(TAU**2 * precision)
                    - 0.5 * squares / SIGMA**2 + 0.5 * (sums / SIGMA**2) ** 2 / precision).sum(-1)
    return float(torch.logsumexp(log_marginal, 0)) - n * math.log(num_components)


exact = {"two components": exact_log_z(y, 2), "one component": exact_log_z(y, 1)}
print("exact log Z:", {k: round(v, 4) for k, v in exact.items()})

# %% OSDS
# the smoke preset searches with 2 starts; this tutorial is about the modes, so it keeps the default search
options = dict(num_samples=1000, preset="smoke", mode_search_starts=64) if SMOKE else dict(num_samples=2000)
fits = {"two components": OSDS(two_components, **options).run(y), "one component": OSDS(one_component, **options).run(y)}
ev = fits["two components"].log_evidence()
print(ev)  # each chain: one component per labelling, with its share of the mass
print(f"error {ev.log_z - exact['two components']:+.4f} = {(ev.log_z - exact['two components']) / ev.se:+.1f} SE")

# %% Both labellings carry half the mass
locs = fits["two components"].get_samples(resample=False)["locs"]  # the raw draws, in the weights' order
weights = fits["two components"].get_normalized_weights()
print(f"P(locs[0] < locs[1]) = {float(weights[locs[:, 0] < locs[:, 1]].sum()):.3f} (exactly 0.5 by symmetry)")

# %% Bayes factor: two components against one
print(compare(fits).to_string())
print(f"exact log Bayes factor: {exact['two components'] - exact['one component']:.3f}")
