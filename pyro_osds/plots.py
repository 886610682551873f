# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Matplotlib pictures of a fitted :class:`~pyro_osds.OSDS`: how training went, and what its importance
weights say.

* :func:`plot_training`: the loss, the training draws' ELBO and their ESS/N over the iterations, one line per
  chain (per mixture component when a chain is a mixture), smoothed by a running mean;
* :func:`plot_weights`: per chain, the histogram of the log importance weights relative to their mean
  weight, :math:`\log(w_i / \bar w)` (0: an average draw; a long right tail: a few draws dominate), titled
  with the Pareto :math:`\hat k` and the Kish ESS/N, and the largest weights' share.

Both return the Matplotlib axes (Matplotlib is imported when they are called).
"""

from __future__ import annotations

import math

import torch

__all__ = ["plot_training", "plot_weights", "training_histories"]

#: what :func:`plot_training` can show: history key -> axis label
TRAINING_PANELS = {"loss": "loss", "elbo": "ELBO of the training draws", "ess": "ESS/N of the training draws"}


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - matplotlib is a test and tutorial dependency
        raise ImportError("Plotting needs Matplotlib: `pip install matplotlib`.") from err
    return plt


def training_histories(osds) -> list[dict[str, dict[str, list]]]:
    """Per chain, ``{label: history}`` of every trained network (``""`` for a chain's one flow; ``"component k"``
    for a mixture's components; ``"consistency"`` for CDDS's second phase). A history maps a key (``loss``,
    ``elbo``, the one-step objective's ``flow_kl_ess``, ...) to one value per iteration."""
    if not osds.samplers:
        raise RuntimeError("Call `run(...)` (or `fit(...)`) first.")
    out = []
    for sampler in osds.samplers:
        flows = getattr(sampler, "components", None)
        named = [(f"component {k}", c) for k, c in enumerate(flows)] if flows is not None else [("", sampler)]
        chain: dict[str, dict[str, list]] = {}
        for label, flow in named:
            for phase, trainer in enumerate(flow.trainers):
                name = " ".join(p for p in (label, "consistency" if phase else "") if p)
                if trainer.step:
                    chain[name] = trainer.history
        out.append(chain)
    return out


def _running_mean(values: list, window: int) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float64, device="cpu")
    finite = torch.isfinite(x)
    x = torch.where(finite, x, torch.zeros_like(x))
    total, count = torch.cumsum(x, 0), torch.cumsum(finite.double(), 0)
    lag = lambda t: torch.cat([torch.zeros(window, dtype=t.dtype, device=t.device), t[:-window]]) if window < len(t) else 0 * t  # noqa: E731
    n = count - lag(count)
    return torch.where(n > 0, (total - lag(total)) / n.clamp_min(1), torch.full_like(x, math.nan))


def plot_training(osds, *, panels: tuple[str, ...] = ("loss", "elbo", "ess"), smooth: int = 25, axes=None):
    """
    The training curves of every chain (module docstring).

    :param OSDS osds: a fitted runner.
    :param tuple panels: which of ``"loss"``, ``"elbo"``, ``"ess"`` (the training draws' ESS/N, for the one-step
        objective) to draw, one axis each.
    :param int smooth: running-mean window in iterations (1: raw values).
    :param axes: Matplotlib axes to draw on, one per panel (default: a new figure).
    :returns: the axes.
    """
    unknown = [p for p in panels if p not in TRAINING_PANELS]
    if unknown or not panels:
        raise ValueError(f"`panels` must name some of {list(TRAINING_PANELS)}, got {panels!r}.")
    if int(smooth) < 1:
        raise ValueError(f"`smooth` must be a positive number of iterations, got {smooth!r}.")
    histories = training_histories(osds)
    plt = _pyplot()
    if axes is None:
        _, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        axes = axes[0]
    if len(axes) != len(panels):
        raise ValueError(f"`axes` must hold one axis per panel ({len(panels)}), got {len(axes)}.")
    keys = {"loss": "loss", "elbo": "elbo", "ess": "flow_kl_ess"}
    for ax, panel in zip(axes, panels, strict=True):
        drawn = False
        for chain, networks in enumerate(histories):
            for label, history in networks.items():
                values = history.get(keys[panel], [])
                if not values or not any(math.isfinite(v) for v in values):
                    continue
                ax.plot(range(1, len(values) + 1), _running_mean(values, int(smooth)).numpy(), lw=1.2,
                        label=" ".join(p for p in (f"chain {chain}", label) if p))
                drawn = True
        ax.set_xlabel("iteration")
        ax.set_ylabel(TRAINING_PANELS[panel])
        if panel == "ess":
            ax.set_ylim(0, 1.02)
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not recorded" if any(histories) else "no training (the preconditioner fits)",
                    ha="center", va="center", transform=ax.transAxes)
    return axes


def plot_weights(osds, *, bins: int = 50, axes=None):
    r"""
    The importance weights of the current draws, one histogram per chain (module docstring).

    :param OSDS osds: a runner with draws.
    :param int bins: histogram bins.
    :param axes: Matplotlib axes, one per chain (default: a new figure).
    :returns: the axes.
    """
    evidence = osds.log_evidence()  # raises unless there are draws
    plt = _pyplot()
    num_chains = len(osds.draws)
    if axes is None:
        _, axes = plt.subplots(1, num_chains, figsize=(4.2 * num_chains, 3.2), squeeze=False)
        axes = axes[0]
    if len(axes) != num_chains:
        raise ValueError(f"`axes` must hold one axis per chain ({num_chains}), got {len(axes)}.")
    for chain, (ax, draws, est) in enumerate(zip(axes, osds.draws, evidence.chains, strict=True)):
        log_w = draws.log_weight.detach().cpu().to(torch.float64)
        log_w = log_w[torch.isfinite(log_w)]
        relative = log_w - (torch.logsumexp(log_w, 0) - math.log(len(log_w)))
        top = torch.softmax(log_w, 0).sort(descending=True).values
        ax.hist(relative.numpy(), bins=bins, color="C0" if est.tail_ok else "C3", alpha=0.8)
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel(r"$\log(w_i / \bar w)$")
        ax.set_ylabel("draws")
        verdict = "" if est.reliable else " (unreliable)"
        ax.set_title(f"chain {chain}: $\\hat k$ = {est.k_hat:.2f}, ESS/N = {est.ess_per_draw:.2f}{verdict}",
                     fontsize="medium")
        top_share = float(top[: max(1, len(top) // 100)].sum())
        ax.text(0.02, 0.95, f"largest weight {float(top[0]):.3f}\nlargest 1%: {top_share:.3f}", ha="left", va="top",
                transform=ax.transAxes, fontsize="small")
    return axes
