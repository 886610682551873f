# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Helpers and constants shared by several test files (a helper used by one file stays in that file)."""

import math

import torch
from torch import nn

from pyro_osds import OSDS
from pyro_osds.ops.nets import StepConditionedControl

D64 = torch.float64
# Statistical assertions: z = 4.5 keeps the false-alarm rate per assertion below 1e-5 (Gaussian tails).
Z = 4.5


def within(estimate, truth, se, bias=0.0):
    return abs(estimate - truth) <= Z * se + bias + 1e-9


# ------------------------------------------------------------------------------------------------
# numerics (pyro_osds.ops): a random control network and a potential with a varying Hessian
DIM = 4


def make_potential(scale=1.0):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(DIM, DIM, dtype=D64, generator=g)
    prec = a @ a.T / DIM + torch.eye(DIM, dtype=D64)
    w = torch.randn(DIM, dtype=D64, generator=g)

    def potential(x):
        # Gaussian + softplus + quartic: a Hessian that varies with x
        return scale * (0.5 * ((x @ prec) * x).sum(-1) + nn.functional.softplus(x @ w) + 0.05 * (x**4).sum(-1))

    return potential


def random_net(scale=0.3, seed=0):
    torch.manual_seed(seed)
    net = StepConditionedControl(DIM, hidden_dim=16, dtype=D64)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def quadratic(x):
    return 0.5 * ((x - 1.0) ** 2).sum(-1)


# ------------------------------------------------------------------------------------------------
# a shifted, anisotropic 3-D Gaussian with its exact log Z
MU = torch.tensor([1.0, -0.5, 2.0], dtype=D64)
SD = torch.tensor([0.5, 1.5, 1.0], dtype=D64)
LOG_Z = float((0.5 * math.log(2 * math.pi) + SD.log()).sum())


def potential(params):
    return 0.5 * (((params["x"] - MU) / SD) ** 2).sum()


def batched(x):
    return 0.5 * (((x - MU) / SD) ** 2).sum(-1)


def fitted(**kw):
    # early stopping off: the Gaussian's preconditioner alone fits it, and these runs are about training
    options = dict(potential_fn=potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=300,
                   preset="smoke", early_stopping=False)
    options.update(kw)
    return OSDS(**options).run()


def fitted_module_osds():
    """The fitted runner that a test file's module-scoped ``osds`` fixture shares between its tests."""
    import pyro

    pyro.set_rng_seed(1)
    return fitted()


# ------------------------------------------------------------------------------------------------
# a two-component mixture, 0.3 / 0.7 at (-2, 0) / (2, 0); log Z = 0
def mixture_potential(x):
    left = torch.distributions.Normal(torch.tensor([-2.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    right = torch.distributions.Normal(torch.tensor([2.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    return -torch.logaddexp(left + math.log(0.3), right + math.log(0.7))


# a 0.3 / 0.7 mixture at (-3, 0) / (3, 0) for the preconditioner's mode search
def two_mode_potential(x):
    left = torch.distributions.Normal(torch.tensor([-3.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    right = torch.distributions.Normal(torch.tensor([3.0, 0.0], dtype=D64), 0.5).log_prob(x).sum(-1)
    return -torch.logaddexp(left + math.log(0.3), right + math.log(0.7))


# ------------------------------------------------------------------------------------------------
# short runs on a quartic potential: interruption, checkpoints and exact resumption
def quartic_potential(params):
    x = params["x"]
    return 0.5 * (((x - 1.0) / 0.7) ** 2).sum() + 0.1 * (x**4).sum()


def make(**kw):
    options = dict(potential_fn=quartic_potential, initial_params={"x": torch.zeros(3, dtype=D64)}, num_samples=100,
                   preset="smoke", early_stopping=False)
    options.update(kw)
    return OSDS(**options)


def net_params(osds):
    return [p.detach().clone() for s in osds.samplers for p in list(s.trainer.net.parameters())
            + list(s.trainer.ema.parameters())]


def assert_same_training(a, b):
    pa, pb = net_params(a), net_params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a.samplers, b.samplers, strict=True):
        assert sa.trainer.step == sb.trainer.step
        assert sa.trainer.history["loss"] == sb.trainer.history["loss"]


def gaussian_mixture_potential(locs, weights, scale=1.0):
    """The potential of a normalised Gaussian mixture (log Z = 0) with isotropic components."""
    locs = torch.as_tensor(locs, dtype=D64, device="cpu")
    log_weights = torch.as_tensor(weights, dtype=D64, device="cpu").log()

    def potential(x):
        comp = torch.distributions.Normal(locs, scale).log_prob(x[..., None, :]).sum(-1)
        return -torch.logsumexp(comp + log_weights, -1)

    return potential
