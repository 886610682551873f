# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Which operations support the second derivatives of a :func:`torch.func.vmap`-batched potential on each device at
hand (issue #23: on an H100 with torch 2.11 + CUDA 13 the vmap check of ``Bernoulli(logits=X @ w)`` failed with
"Trying to backward through the graph a second time" where the CPU passes). Prints one line per likelihood form and
device, and for each failure the forward operation that made the failing node (``torch.autograd`` anomaly mode);
then how ``hier1000`` of :mod:`benchmarks.scaling` is set up on each device (whitened on the CPU, not on the H100),
with every error a candidate check caught.

.. code-block:: bash

    python -m benchmarks.gpu_diagnose
"""

from __future__ import annotations

import time
import traceback
import warnings

import pyro.distributions as dist
import torch
import torch.nn.functional as F


def _forms() -> dict:
    return {
        "pyro Bernoulli(logits)": lambda w, X, y: dist.Bernoulli(logits=X @ w).log_prob(y).sum(),
        "torch Bernoulli(logits)": lambda w, X, y: torch.distributions.Bernoulli(logits=X @ w).log_prob(y).sum(),
        "bce_with_logits": lambda w, X, y: -F.binary_cross_entropy_with_logits(X @ w, y, reduction="none").sum(),
        "bce_with_logits(sum)": lambda w, X, y: -F.binary_cross_entropy_with_logits(X @ w, y, reduction="sum"),
        "softplus form": lambda w, X, y: (y * (X @ w) - F.softplus(X @ w)).sum(),
        "Normal(X @ w)": lambda w, X, y: dist.Normal(X @ w, 1.0).log_prob(y).sum(),
        "(X * w).sum(-1) + bce": lambda w, X, y: -F.binary_cross_entropy_with_logits(
            (X * w).sum(-1), y, reduction="none").sum(),
        "matmul only": lambda w, X, y: ((X @ w) ** 2).sum(),
        "Normal prior": lambda w, X, y: dist.Normal(torch.zeros_like(w), 1.0).to_event(1).log_prob(w),
    }


def _second_order(f, device: str, dtype: torch.dtype, anomaly: bool = False, functorch: bool = False) -> str:
    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(120, 4, generator=g, dtype=dtype, device="cpu").to(device)
    y = (torch.rand(120, generator=g, dtype=dtype, device="cpu") < 0.5).to(dtype).to(device)
    z = (0.1 * torch.randn(3, 4, generator=g, dtype=dtype, device="cpu")).to(device).requires_grad_(True)
    try:
        with torch.autograd.set_detect_anomaly(anomaly), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if functorch:  # the first derivative by torch.func, the second by autograd through it
                grad = torch.func.vmap(torch.func.grad(lambda w: f(w, X, y)))(z)
            else:
                value = torch.func.vmap(lambda w: f(w, X, y))(z)
                (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True)
            torch.autograd.grad(grad[:, 0].sum(), z, allow_unused=True)
        return "ok"
    except Exception as err:  # noqa: BLE001 - a diagnosis: every failure is reported
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" + (
            "\n" + traceback.format_exc(limit=-6) if anomaly else "")


def _model_check(device: str) -> str:
    """pyro_osds's own vmap check (its second derivatives) on an unplated logistic regression (``X @ w``), with the
    anomaly-mode traceback of a failure."""
    import pyro

    from pyro_osds import OSDS

    def unplated(X, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1], device=X.device), 1.0).to_event(1))
        pyro.sample("obs", dist.Bernoulli(logits=X @ w).to_event(1), obs=y)

    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(120, 4, generator=g, device="cpu").to(device)
    y = (torch.rand(120, generator=g, device="cpu") < 0.5).float().to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target = OSDS(unplated, disable_progbar=True).setup(X, y).target
    probe = target.probe_points()
    with torch.no_grad():
        reference = target.pyro_potential(probe)
    with torch.autograd.set_detect_anomaly(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = target._verify("vmap", probe, reference)
        if reason is None:
            return f"selected {target.vectorize!r}; vmap check ok"
        try:
            z = probe.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(target._potentials["vmap"](z).sum(), z, create_graph=True)
            torch.autograd.grad(grad[:, 0].sum(), z, allow_unused=True)
        except Exception:  # noqa: BLE001
            return f"selected {target.vectorize!r}; vmap: {reason}\n{traceback.format_exc(limit=-8)}"
        return f"selected {target.vectorize!r}; vmap: {reason}"


def _whitening_check(device: str) -> str:
    """How the random-effects model of :mod:`benchmarks.scaling` (``hier1000``; on an H100 it came out unwhitened,
    on the CPU it is whitened) is set up on ``device``: the sites whitened and non-centred, and every error that a
    candidate check caught and took for "does not apply" (printed as it is caught)."""
    import importlib

    from benchmarks.scaling import get_scaling_target
    from pyro_osds import OSDS

    caught = []

    def recording(original):
        def raise_device_errors(err):
            frame = traceback.extract_stack(limit=2)[0]
            caught.append(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}")
            original(err)
        return raise_device_errors

    modules = [importlib.import_module(f"pyro_osds.{m}") for m in
               ("whitening", "reparam", "inputs", "ops.precondition", "ops.mode_search")]
    originals = {m: m.raise_device_errors for m in modules}
    for m in modules:
        m.raise_device_errors = recording(originals[m])
    try:
        target = get_scaling_target("hier1000", 0)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in target.model_args)
        start = time.perf_counter()
        runner = OSDS(target.model, disable_progbar=True).setup(*args)
        seconds = time.perf_counter() - start
    finally:
        for m in modules:
            m.raise_device_errors = originals[m]
    flat = runner.target
    lines = [f"set up in {seconds:.1f} s: whitened {list(getattr(flat, 'whitened_sites', ()))}, sites "
             f"{[site.name for site in flat.sites][:6]}, vectorize {getattr(flat, 'vectorize', None)!r}"]
    lines += [f"  caught: {c}" for c in caught] or ["  nothing caught"]
    return "\n".join(lines)


def main() -> int:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    failures = []
    for dtype in (torch.float32, torch.float64):
        for name, f in _forms().items():
            row = {device: _second_order(f, device, dtype) for device in devices}
            print(f"{str(dtype)[6:]:8s} {name:26s} " + " | ".join(f"{d}: {r}" for d, r in row.items()), flush=True)
            failures += [(name, f, d, dtype) for d, r in row.items() if r != "ok"]
            for d, r in row.items():
                if r != "ok":
                    print(f"{'':8s} {'':26s} {d} through torch.func.grad: {_second_order(f, d, dtype, functorch=True)}")
    for name, f, device, dtype in failures[:2]:  # where the failing node was made
        print(f"--- {name} on {device} ({dtype}), anomaly mode:\n{_second_order(f, device, dtype, anomaly=True)}")
    for device in devices:
        try:
            print(f"--- pyro_osds on {device}: {_model_check(device)}", flush=True)
        except Exception:  # noqa: BLE001
            print(f"--- pyro_osds on {device}: {traceback.format_exc(limit=-8)}", flush=True)
    for device in devices:
        try:
            print(f"--- hier1000's whitening on {device}: {_whitening_check(device)}", flush=True)
        except Exception:  # noqa: BLE001
            print(f"--- hier1000's whitening on {device}: {traceback.format_exc(limit=-8)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
