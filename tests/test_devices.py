# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
The CPU-side guard of device placement (issue #23; tests/test_gpu.py runs on a GPU): the package must never create
a tensor on a device it did not take from the model's data, the user's ``device=`` or the CPU by decision. On a GPU
a factory call without a device lands on the default device (the CPU, or CUDA under
``torch.set_default_device("cuda")``) and a random generator on another device than the call's raises; on a CPU
both go unnoticed. So every tensor factory called from the package's code, along a run that goes through every
stage, must name its device, and every generator the package makes must name its own.
"""

import ast
import collections
import os
import sys
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch.overrides import TorchFunctionMode

import pyro_osds
from pyro_osds import OSDS, compare
from pyro_osds.config import OSDSConfig
from pyro_osds.samplers import FlowSampler
from tests.common import D64, gaussian_mixture_potential

PACKAGE = Path(pyro_osds.__file__).parent
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.randn, torch.rand, torch.randint, torch.randperm,
             torch.arange, torch.eye, torch.linspace, torch.logspace, torch.tensor, torch.normal, torch.empty_strided,
             torch.scalar_tensor}


class DeviceLessFactories(TorchFunctionMode):
    """Records the tensor factories (and ``torch.as_tensor`` of Python data) that the package's own code calls
    without ``device=``, by file, line and function."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        factory = func in FACTORIES or (func is torch.as_tensor and args and not isinstance(args[0], torch.Tensor))
        if factory and "device" not in kwargs:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(PACKAGE) + os.sep):
                self.calls[(os.path.relpath(caller, PACKAGE), sys._getframe(1).f_lineno, func.__name__)] += 1
        return func(*args, **kwargs)


def model(X, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype, device=X.device), 1.0).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(1.0, dtype=X.dtype, device=X.device)))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("obs", dist.Bernoulli(logits=scale * (X @ w)), obs=y)


def test_every_tensor_the_package_makes_names_its_device():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=D64)
    y = (torch.rand(40, generator=g, dtype=D64) < torch.sigmoid(X[:, 0])).to(D64)
    guard = DeviceLessFactories()
    with warnings.catch_warnings(), guard:
        warnings.simplefilter("ignore")
        pyro.set_rng_seed(0)
        # a Pyro model: the target's probe, the mode search, training, drawing, resampling, predictive and ArviZ
        osds = OSDS(model, num_samples=60, preset="smoke", chain_method="sequential", disable_progbar=True).run(X, y)
        osds.to_datatree(posterior_predictive=osds.predictive())
        osds.summary_dict()
        osds.diagnostics()
        compare({"a": osds, "b": osds})

        def hierarchical(y):  # the non-centring choice: its candidates' trace, both mean-field fits, its reports
            s = pyro.sample("s", dist.HalfNormal(y.new_ones(())))
            pyro.sample("walk", dist.MultivariateNormal(y.new_zeros(3), scale_tril=s * torch.eye(3, dtype=y.dtype)))
            with pyro.plate("groups", y.shape[0]):
                theta = pyro.sample("theta", dist.Normal(y.new_zeros(()), s))
                pyro.sample("obs", dist.Normal(theta, 1.0), obs=y)

        OSDS(hierarchical, num_samples=20, num_chains=1, preset="smoke", disable_progbar=True).run(y[:5]).get_samples()
        # a mixture of flows (the mixture transport's component choice and order), CDDS, the marginal mixture
        mixture = OSDS(potential_fn=lambda p: gaussian_mixture_potential([[-4.0, 0.0], [4.0, 0.0]], [0.3, 0.7])(
            p["x"]), initial_params={"x": torch.zeros(2, dtype=D64)}, num_samples=60, num_iterations=5,
            chain_method="sequential", disable_progbar=True).run()
        mixture.get_samples()
        cdds = FlowSampler(lambda x: 0.5 * (x**2).sum(-1), torch.zeros(2, dtype=D64),
                           OSDSConfig.for_method("cdds", OSDSConfig.preset("smoke"), num_iterations=3,
                                                 consistency_iterations=3), disable_progbar=True)
        cdds.fit()
        cdds.draw(20)

        def wells(x):  # 2^10 modes: more than the search enumerates, so a marginal mixture preconditions
            return -torch.logaddexp(-0.5 * (x + 3.5) ** 2 + torch.log(torch.tensor(0.25, dtype=x.dtype, device=x.device)),
                                    -0.5 * (x - 3.5) ** 2 + torch.log(torch.tensor(0.75, dtype=x.dtype,
                                                                                    device=x.device))).sum(-1)

        marginal = FlowSampler(wells, torch.zeros(10, dtype=D64), OSDSConfig(num_iterations=3), disable_progbar=True)
        marginal.fit()
        marginal.check_modes(marginal.draw(100))
    assert marginal.report.marginal_mixture and len(mixture.samplers[0].components) == 2
    assert not guard.calls, "tensor factories without a device: " + ", ".join(
        f"{path}:{line} {name}" for path, line, name in sorted(guard.calls))


def test_every_generator_the_package_makes_names_its_device():
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator"
                    and not node.args and not any(k.arg == "device" for k in node.keywords)):
                unnamed.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not unnamed, f"torch.Generator() without a device: {unnamed}"
