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
import math
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
             torch.scalar_tensor, torch.as_tensor, torch.asarray}
try:  # the functions into which `torch.set_default_device` inserts its device (torch's own list, where it has one)
    from torch.utils._device import _device_constructors

    FACTORIES |= set(_device_constructors())
except ImportError:
    pass


class DeviceLessFactories(TorchFunctionMode):
    """Records the tensor factories that the package's own code calls without ``device=``, by file, line and
    function: ``torch.as_tensor`` of a tensor too, which ``torch.set_default_device`` turns into a move to the
    default device (the GPU's data were moved to the CPU so)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
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
        marginal, mixture = _pyro_model_stages(X, y), None
        # and with another default device than the data's (as `torch.set_default_device` may leave it): a tensor
        # made there by the package, or by Pyro or torch on the package's behalf (Pyro's Pareto fit on the CPU's
        # log-weights, seen on a GPU), fails the run. (A Pyro model's own trace makes tensors on the default device.)
        torch.set_default_device("meta")
        try:
            marginal, mixture = _potential_stages()
        finally:
            torch.set_default_device(None)
    assert marginal.report.marginal_mixture and len(mixture.samplers[0].components) == 2
    assert mixture.draws[0].x.device.type == "cpu" and math.isfinite(mixture.log_evidence().log_z)
    assert not guard.calls, "tensor factories without a device: " + ", ".join(
        f"{path}:{line} {name}" for path, line, name in sorted(guard.calls))


def _pyro_model_stages(X, y):
    """A Pyro model: the target's probe, the mode search, training, drawing, resampling, predictive, ArviZ, and the
    non-centring choice."""
    pyro.set_rng_seed(0)
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


def _potential_stages():
    """A mixture of flows (the mixture transport's component choice and order) with its evidence and draws, CDDS,
    the marginal mixture."""
    mixture = OSDS(potential_fn=lambda p: gaussian_mixture_potential([[-4.0, 0.0], [4.0, 0.0]], [0.3, 0.7])(p["x"]),
                   initial_params={"x": torch.zeros(2, dtype=D64, device="cpu")}, num_samples=60, num_iterations=5,
                   chain_method="sequential", disable_progbar=True).run()
    mixture.get_samples()
    mixture.to_datatree()
    cdds = FlowSampler(lambda x: 0.5 * (x**2).sum(-1), torch.zeros(2, dtype=D64, device="cpu"),
                       OSDSConfig.for_method("cdds", OSDSConfig.preset("smoke"), num_iterations=3,
                                             consistency_iterations=3), disable_progbar=True)
    cdds.fit()
    cdds.draw(20)

    def wells(x):  # 2^10 modes: more than the search enumerates, so a marginal mixture preconditions
        return -torch.logaddexp(-0.5 * (x + 3.5) ** 2 + math.log(0.25), -0.5 * (x - 3.5) ** 2 + math.log(0.75)).sum(-1)

    marginal = FlowSampler(wells, torch.zeros(10, dtype=D64, device="cpu"), OSDSConfig(num_iterations=3),
                           disable_progbar=True)
    marginal.fit()
    marginal.check_modes(marginal.draw(100))
    return marginal, mixture


def test_every_generator_the_package_makes_names_its_device():
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator"
                    and not node.args and not any(k.arg == "device" for k in node.keywords)):
                unnamed.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not unnamed, f"torch.Generator() without a device: {unnamed}"


#: handlers that catch RuntimeError (or wider) without raising again or calling `raise_device_errors`, and why a
#: device's error cannot hide there
ALLOWED_CATCHES = {
    ("chains.py", "_attempt"): "the chain's error is raised again once every chain has stopped",
    ("parallel.py", "_child"): "a forked job's error travels to the parent, which raises it (as text if it does not "
                               "pickle)",
}


def test_no_handler_takes_an_error_of_the_device_for_the_models():
    # on an H100 a model came out unwhitened: every `except RuntimeError` that means "this candidate does not
    # apply" must let an error of placement or of the device through (pyro_osds.util.raise_device_errors)
    unguarded, seen = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.ExceptHandler):
                    continue
                caught = [] if node.type is None else (
                    node.type.elts if isinstance(node.type, ast.Tuple) else [node.type])
                names = {ast.unparse(e) for e in caught} if caught else {"BaseException"}
                if not names & {"RuntimeError", "Exception", "BaseException"}:
                    continue
                body = [n for statement in node.body for n in ast.walk(statement)]
                guarded = any(isinstance(n, ast.Raise) for n in body) or any(
                    isinstance(n, ast.Name) and n.id == "raise_device_errors" for n in body)
                key = (path.relative_to(PACKAGE).as_posix(), function.name)
                seen.add(key)
                if not guarded and key not in ALLOWED_CATCHES:
                    unguarded.append(f"{key[0]}:{node.lineno} ({function.name})")
    assert not unguarded, f"handlers that would hide a device's error: {sorted(set(unguarded))}"
    assert set(ALLOWED_CATCHES) <= seen, f"allowed handlers no longer there: {set(ALLOWED_CATCHES) - seen}"


def test_every_factory_call_in_the_package_names_its_device():
    # the runtime guard above sees the lines its run executes; this one reads every call (a `randperm` of
    # `get_samples(num_samples=...)` and host statistics made on the default device were missed so)
    factories = {f.__name__ for f in FACTORIES}
    unnamed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in factories and not any(k.arg == "device" for k in node.keywords)):
                unnamed.append(f"{path.relative_to(PACKAGE)}:{node.lineno} torch.{node.func.attr}")
    assert not unnamed, f"tensor factories without a device: {unnamed}"
