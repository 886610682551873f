# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The methods compared by the benchmark harness, their budgets (harness presets) and the reference
values they are measured against.

Methods (each a function ``run_<name>(ctx) -> dict`` in :data:`METHODS`; all use the target's
float64 bare ``potential`` unless stated):

``osds``
    :class:`pyro_osds.samplers.FlowSampler` trained with the preset's :class:`~pyro_osds.OSDSConfig`,
    evaluated at every step budget :math:`K \in \{1, 2, 4, \dots, T\}` with three kinds of
    importance weights: the exact discrete log-determinant of the deterministic flow ("DF",
    ``log_det="exact"``), the OSDS authors' Euler--Hutchinson DF volume ("EH",
    ``log_det="hutchinson"``, ``config.evaluation.num_probes`` Rademacher probes per step) and stochastic
    Euler--Maruyama path weights ("EM", :meth:`~pyro_osds.samplers.FlowSampler.em_evidence`); each with
    ``eval_draws`` fresh draws times ``eval_repeats`` independent repeats (optionally fewer for the
    costly exact weights at large :math:`K`, :meth:`HarnessPreset.repeats`).
``dis``
    The plain many-step diffusion sampler: the same engine trained without self-distillation
    (:func:`make_dis_config`), evaluated at its natural :math:`K = T` and at :math:`K = 1`.
``nuts``
    Pyro ``MCMC(NUTS(target.model))`` on the Pyro model (default NUTS settings, one chain, no JIT).
    Its constrained draws are mapped to the flat unconstrained layout with the transforms of
    :func:`pyro.infer.mcmc.util.initialize_model` (``biject_to(support).inv`` per site), then
    ``target.from_sites``.
``svi_is``
    "What a Pyro user would do today for log Z": SVI with an
    :class:`~pyro.infer.autoguide.AutoIAFNormal` guide on the Pyro model, then importance sampling
    with the guide as proposal (``vectorized_importance_weights`` when the model broadcasts over a
    particle dimension, else a loop over guide draws with ``poutine.trace`` / ``poutine.replay``).
``laplace_is``
    Importance sampling from the Laplace Gaussian of :func:`pyro_osds.ops.precondition.fit_laplace`.

References (:func:`build_reference`): log Z from ``target.log_z`` (exact) or
``benchmarks/references.json``; posterior moments from ``references.json``, else from
``exact_moment_draws`` exact draws, else from the NUTS run of the same harness run; reference draws
for Sinkhorn / MMD from the exact sampler, else from the NUTS draws of the same harness run (saved
under ``<out>/draws/``).
"""

from __future__ import annotations

import json
import math
import time
import traceback
import types
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal
from pyro.infer.importance import vectorized_importance_weights
from pyro.infer.mcmc.util import initialize_model

from pyro_osds.config import PRESETS as ENGINE_PRESETS
from pyro_osds.config import OSDSConfig
from pyro_osds.ops.estimators import EvidenceError, evidence
from pyro_osds.ops.precondition import fit_laplace
from pyro_osds.samplers import FlowSampler, MixtureSampler, build_sampler

from . import metrics
from .targets import Target

__all__ = [
    "HarnessPreset",
    "METHODS",
    "DEFAULT_METHODS",
    "METHOD_NAMES",
    "PRESETS",
    "REFERENCES_PATH",
    "Reference",
    "RunContext",
    "SMALL_TARGETS",
    "build_reference",
    "get_preset",
    "laplace_importance_draws",
    "load_references",
    "make_dis_config",
    "make_method_config",
    "potential_on_device",
    "run_dis",
    "run_laplace_is",
    "run_nuts",
    "run_osds",
    "run_svi_is",
]

D64 = torch.float64
REFERENCES_PATH = Path(__file__).resolve().parent / "references.json"

#: The targets of the ``cpu`` preset (everything except the 50-D mixtures and the GPU-scale ones).
SMALL_TARGETS = ("funnel10", "gmm9_2d", "many_well32", "ionosphere", "sonar", "german_credit", "breast_cancer",
                 "seeds", "brownian")
#: Method names, in the order the harness runs them for a target (NUTS first: its draws are a reference).
#: All methods, in their canonical run order (NUTS first: its draws are references).
METHOD_NAMES = ("nuts", "osds", "dis", "svi_is", "laplace_is", "osds_paper", "scds", "cdds")

#: Draws are clipped coordinate-wise to ``[-c, c]`` before Sinkhorn / MMD (the OSDS evaluation clips
#: funnel draws to [-30, 30]; the funnel's tails otherwise dominate any transport distance).
METRIC_CLIP = {"funnel10": 30.0}


# ---------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class HarnessPreset:
    r"""
    Budgets of one harness preset.

    :param str name: preset name.
    :param str osds_preset: name of the :class:`~pyro_osds.OSDSConfig` preset for ``osds``.
    :param str paper_preset: the preset of the paper's objective, the base of ``osds_paper``, ``dis``,
        ``scds`` and ``cdds``.
    :param dict osds_changes: changes applied on top of it.
    :param dict paper_changes: changes applied on top of ``paper_preset``.
    :param str device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when available) for ``osds`` / ``dis``;
        the baselines always run on the CPU.
    :param int eval_draws: draws per evaluation (:math:`N`).
    :param int eval_repeats: independent evaluations per step budget (:math:`R`).
    :param step_budgets: step budgets :math:`K` for ``osds``; ``None`` for :math:`1, 2, 4, \dots, T`.
    :param exact_reduced_above: for exact DF weights at :math:`K` above this, only
        ``exact_reduced_repeats`` repeats (the exact log-determinant costs about :math:`K` times
        :math:`D` backward passes per draw, which dominates the CPU budget); ``None``: never.
    :param int exact_reduced_repeats: see ``exact_reduced_above``.
    :param int metric_draws: draws (of the method and of the reference) used for Sinkhorn and MMD.
    :param int timing_draws: the "10^4 draws" timing (with and without weights).
    :param int timing_draws_large: the "10^6 draws" timing (without weights, in chunks).
    :param int timing_chunk: chunk size of the large timing.
    :param int dis_timing_draws: ``dis`` times its :math:`K = T` draws on this many draws instead of
        ``timing_draws`` (a :math:`T`-step flow with exact weights costs about :math:`T` times more);
        the report scales every timing to 10^4 / 10^6 draws and shows the measured number.
    :param int dis_timing_draws_large: likewise for ``timing_draws_large``.
    :param int exact_moment_draws: exact draws for reference moments of the synthetic targets.
    :param int nuts_samples: NUTS draws kept.
    :param int nuts_warmup: NUTS warm-up iterations.
    :param int svi_steps: SVI iterations.
    :param float svi_lr: initial learning rate of ClippedAdam (decayed to 10 % over the run).
    :param int svi_num_transforms: IAF layers of the guide.
    :param int svi_particles: ELBO particles per SVI step.
    :param int svi_is_draws: importance-sampling draws from the guide.
    :param int laplace_draws: importance-sampling draws from the Laplace Gaussian.
    """

    name: str
    osds_preset: str
    paper_preset: str = "paper-cpu"
    osds_changes: dict = field(default_factory=dict)
    paper_changes: dict = field(default_factory=dict)
    device: str = "cpu"
    eval_draws: int = 2000
    eval_repeats: int = 5
    step_budgets: tuple | None = None
    exact_reduced_above: int | None = None
    exact_reduced_repeats: int = 2
    metric_draws: int = 1000
    timing_draws: int = 10_000
    timing_draws_large: int = 1_000_000
    timing_chunk: int = 100_000
    dis_timing_draws: int = 2000
    dis_timing_draws_large: int = 20_000
    exact_moment_draws: int = 100_000
    nuts_samples: int = 1000
    nuts_warmup: int = 500
    svi_steps: int = 2000
    svi_lr: float = 0.01
    svi_num_transforms: int = 2
    svi_particles: int = 1
    svi_is_draws: int = 10_000
    laplace_draws: int = 10_000

    def osds_config(self) -> OSDSConfig:
        """The engine configuration of ``osds`` (the engine's default objective)."""
        return OSDSConfig.preset(self.osds_preset, **self.osds_changes)

    def paper_config(self) -> OSDSConfig:
        """The configuration of the paper's objective at this preset's budget: the base of ``osds_paper``,
        ``dis``, ``scds`` and ``cdds``."""
        return OSDSConfig.preset(self.paper_preset, **self.paper_changes)

    def resolved_device(self) -> torch.device:
        """The device of the ``osds`` / ``dis`` runs."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def repeats(self, K: int, weights: str) -> int:
        """Independent evaluations for step budget ``K`` and weight kind ``weights``."""
        if weights == "exact" and self.exact_reduced_above is not None and K > self.exact_reduced_above:
            return min(self.eval_repeats, self.exact_reduced_repeats)
        return self.eval_repeats

    def budgets(self, grid_size: int) -> tuple[int, ...]:
        """Step budgets :math:`K` (powers of two up to :math:`T`, or ``step_budgets``) that divide ``grid_size``."""
        if self.step_budgets is not None:
            return tuple(k for k in self.step_budgets if grid_size % k == 0)
        out, k = [], 1
        while k <= grid_size:
            if grid_size % k == 0:
                out.append(k)
            k *= 2
        if out[-1] != grid_size:
            out.append(grid_size)
        return tuple(out)

    def as_dict(self) -> dict:
        return asdict(self)


#: Harness presets: ``smoke`` (seconds per target, for the test), ``cpu`` (this 2-core machine, one
#: thread: the engine's CPU defaults ``OSDSConfig()``) and ``gpu`` (the OSDS paper's budget,
#: ``OSDSConfig.preset("paper")``: 60k iterations, batch 1024, T = 128).
PRESETS: dict[str, HarnessPreset] = {
    "smoke": HarnessPreset(
        name="smoke", osds_preset="smoke", paper_changes=dict(ENGINE_PRESETS["smoke"]), eval_draws=256, eval_repeats=2, metric_draws=256, timing_draws=1000,
        timing_draws_large=10_000, timing_chunk=5000, dis_timing_draws=500, dis_timing_draws_large=2000,
        exact_moment_draws=20_000, nuts_samples=100, nuts_warmup=100,
        svi_steps=100, svi_particles=1, svi_is_draws=500, laplace_draws=10_000,
    ),
    "cpu": HarnessPreset(name="cpu", osds_preset="cpu"),
    "gpu": HarnessPreset(
        name="gpu", osds_preset="cpu", paper_preset="paper", device="auto",
        osds_changes={"num_iterations": 5000, "flow_kl_batch_size": 1024}, metric_draws=2000, svi_steps=5000, svi_is_draws=10_000,
        dis_timing_draws=10_000, dis_timing_draws_large=1_000_000,
    ),
}


def get_preset(name: str) -> HarnessPreset:
    """The harness preset called ``name`` (``smoke``, ``cpu`` or ``gpu``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def make_dis_config(base_config: OSDSConfig) -> OSDSConfig:
    r"""
    The configuration of the plain many-step diffusion sampler (DIS) compared with OSDS: the engine's
    ``method="dis"`` (diffusion-sampler loss only, log-variance, on ``grid_size``-step EM paths) with
    the budget of ``base_config``.

    :param OSDSConfig base_config: the OSDS configuration of the same preset (its budget is kept).
    :return: the DIS configuration.
    """
    return make_method_config("dis", base_config)


def make_method_config(method: str, base_config: OSDSConfig) -> OSDSConfig:
    """``base_config`` switched to the engine's ``method`` (``"dis"``, ``"scds"``, ``"cdds"``, ...)."""
    return OSDSConfig.for_method(method, base_config)


# ---------------------------------------------------------------------------------------------------
# References


@dataclass
class Reference:
    r"""
    What a target's runs are measured against.

    :param log_z: reference :math:`\log Z` (``None`` if unknown) with standard error ``log_z_se``.
    :param str log_z_source: ``"exact"``, ``"references.json (<method>)"`` or ``"none"``.
    :param mean: reference posterior mean ``(D,)`` or ``None``; ``sd`` likewise.
    :param str moments_source: where the moments come from.
    :param draws: reference draws ``(M, D)`` for Sinkhorn / MMD (clipped as in :data:`METRIC_CLIP`) or ``None``.
    :param str draws_source: where the draws come from.
    :param dict floor: Sinkhorn / MMD between two independent reference samples (the metrics' noise
        floor at this sample size), exact samplers only.
    """

    log_z: float | None = None
    log_z_se: float = 0.0
    log_z_source: str = "none"
    mean: torch.Tensor | None = None
    sd: torch.Tensor | None = None
    moments_source: str = "none"
    draws: torch.Tensor | None = None
    draws_source: str = "none"
    floor: dict | None = None

    def summary(self) -> dict:
        """JSON-ready description (without the arrays)."""
        return {"log_z": self.log_z, "log_z_se": self.log_z_se, "log_z_source": self.log_z_source,
                "moments_source": self.moments_source, "draws_source": self.draws_source,
                "num_draws": None if self.draws is None else int(self.draws.shape[0]), "floor": self.floor}


def load_references(path: Path | str = REFERENCES_PATH) -> dict:
    """The per-target entries of ``references.json`` (``{}`` if the file is missing or unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("targets", {}) if isinstance(data, dict) else {}


def _clip_for_metrics(target: Target, x: torch.Tensor) -> torch.Tensor:
    c = METRIC_CLIP.get(target.name)
    return x if c is None else x.clamp(-c, c)


def build_reference(target: Target, preset: HarnessPreset, *, seed: int = 0, nuts_draws: torch.Tensor | None = None,
                    nuts_source: str = "nuts", references: dict | None = None) -> Reference:
    """
    The :class:`Reference` of ``target`` (module docstring for the order of preference).

    :param nuts_draws: flat NUTS draws of the same harness run, if any.
    :param dict references: ``references.json`` entries (default: read the file).
    """
    refs = load_references() if references is None else references
    entry = refs.get(target.name, {}) or {}
    ref = Reference()
    if target.log_z is not None:
        ref.log_z, ref.log_z_se, ref.log_z_source = float(target.log_z), 0.0, "exact"
    elif entry.get("log_z") is not None:
        ref.log_z = float(entry["log_z"])
        ref.log_z_se = float(entry.get("se") or 0.0)
        ref.log_z_source = f"references.json ({str(entry.get('method', '?')).split(':')[0]})"
    mean, sd = entry.get("posterior_mean"), entry.get("posterior_sd")
    if mean is not None and sd is not None and len(mean) == target.dim and len(sd) == target.dim:
        ref.mean, ref.sd = torch.tensor(mean, dtype=D64), torch.tensor(sd, dtype=D64)
        ref.moments_source = f"references.json ({entry.get('posterior_moments_source', '?')})"
    gen = torch.Generator().manual_seed(10_000 + seed)
    if target.sample is not None:
        if ref.mean is None:
            exact = target.sample(preset.exact_moment_draws, generator=gen)
            ref.mean, ref.sd = exact.mean(0), exact.std(0)
            ref.moments_source = f"exact draws ({preset.exact_moment_draws})"
        ref.draws = _clip_for_metrics(target, target.sample(preset.metric_draws, generator=gen))
        ref.draws_source = "exact draws"
        second = _clip_for_metrics(target, target.sample(preset.metric_draws, generator=gen))
        ref.floor = {"sinkhorn": metrics.sinkhorn_divergence(second, ref.draws)["value"],
                     "mmd": metrics.mmd(second, ref.draws)["value"]}
    elif nuts_draws is not None:
        ref.draws = _clip_for_metrics(target, nuts_draws[-preset.metric_draws:].to(D64))
        ref.draws_source = nuts_source
        if ref.mean is None:
            ref.mean, ref.sd = nuts_draws.mean(0), nuts_draws.std(0)
            ref.moments_source = nuts_source
    return ref


# ---------------------------------------------------------------------------------------------------
# Run context and shared helpers


@dataclass
class RunContext:
    """Everything a method run needs: the target, the preset, the seed, the reference and a log function."""

    target: Target
    preset: HarnessPreset
    seed: int
    reference: Reference
    out_dir: Path | None = None
    log: Callable[[str], None] = lambda msg: None


def potential_on_device(potential: Callable, device: torch.device | str) -> Callable:
    r"""
    A copy of a target's ``potential`` whose closed-over tensors (data, locations) live on
    ``device``. The targets of :mod:`benchmarks.targets` keep their data on the CPU inside the
    closure; this rebuilds the closure (recursively through closed-over functions) with moved
    tensors. On the CPU the potential is returned unchanged.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return potential
    memo: dict[int, object] = {}

    def move(obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, types.FunctionType) and obj.__closure__:
            if id(obj) not in memo:
                cells = []
                for cell in obj.__closure__:
                    try:
                        cells.append(types.CellType(move(cell.cell_contents)))
                    except ValueError:  # an empty cell
                        cells.append(types.CellType())
                new = types.FunctionType(obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, tuple(cells))
                new.__kwdefaults__ = obj.__kwdefaults__
                memo[id(obj)] = new
            return memo[id(obj)]
        return obj

    return move(potential)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _now() -> float:
    return time.perf_counter()


def synchronize(device: torch.device) -> None:
    """Waits for ``device``'s queued work (a GPU's), so that a timer read next times it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quality(ctx: RunContext, x: torch.Tensor) -> tuple[dict | None, dict | None]:
    """Sinkhorn and MMD of (unweighted) draws ``x`` against the reference draws."""
    ref = ctx.reference.draws
    if ref is None:
        return None, None
    x = _clip_for_metrics(ctx.target, x.detach().cpu().to(D64)[: ctx.preset.metric_draws])
    return metrics.sinkhorn_divergence(x, ref), metrics.mmd(x, ref)


def _moment_errors(ctx: RunContext, x: torch.Tensor, log_w: torch.Tensor | None) -> dict | None:
    ref = ctx.reference
    if ref.mean is None:
        return None
    mean, sd = metrics.weighted_moments(x.detach().cpu(), None if log_w is None else log_w.detach().cpu())
    return metrics.moment_errors(mean, sd, ref.mean, ref.sd)


def _evaluation(label: str, method: str, weights: str, *, K: int | None, nfe: float | None,
                records: list[dict], ctx: RunContext, num_draws: int, extra: dict | None = None) -> dict:
    r"""
    Aggregates per-repeat records (each with the fields of :class:`~pyro_osds.estimators.Estimates`,
    ``seconds`` and optional ``moments``) into one evaluation entry: mean and sd over repeats, the
    error against the reference and the invalid-ELBO check.
    """
    ref = ctx.reference
    ok = [r for r in records if r.get("error") is None]
    entry = {"label": label, "method": method, "weights": weights, "K": K, "nfe": nfe, "num_draws": num_draws,
             "repeats": len(records), "errors": [r["error"] for r in records if r.get("error") is not None]}
    for key in ("log_z", "se", "elbo", "elbo_se", "ess_per_draw", "k_hat", "num_folded", "num_nonfinite",
                "seconds", "ess_per_s"):
        entry[key] = metrics.mean_sd([r[key] for r in ok if key in r])
    entry["abs_delta_log_z"] = metrics.mean_sd([metrics.abs_delta_log_z(r["log_z"], ref.log_z) for r in ok])
    elbo_se = [r["elbo_se"] for r in ok if math.isfinite(r.get("elbo_se", math.nan))]
    pooled_se = math.sqrt(sum(s * s for s in elbo_se)) / len(elbo_se) if elbo_se else math.nan
    entry["elbo_pooled_se"] = pooled_se
    entry["elbo_invalid"] = metrics.elbo_exceeds_reference(entry["elbo"]["mean"], pooled_se, ref.log_z, ref.log_z_se)
    moments = [r["moments"] for r in ok if r.get("moments") is not None]
    entry["moments"] = ({k: metrics.mean_sd([m[k] for m in moments]) for k in moments[0]} if moments else None)
    entry.update(extra or {})
    return entry


def _estimate_record(log_w: torch.Tensor, seconds: float, *, num_folded: int = 0, log_det: str = "exact") -> dict:
    """Evidence estimates of one set of log-weights (computed on the CPU) with timing and ESS/s."""
    est = evidence(log_w.detach().cpu(), num_folded=num_folded, log_det=log_det)
    rec = est._asdict()
    if log_det not in ("exact", "exact_frozen_langevin"):
        rec.pop("num_folded")  # only the exact log-determinant sees the orientation of the map
    rec["seconds"] = seconds
    rec["ess_per_s"] = metrics.ess_per_second(est.ess, seconds)
    return rec


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------------------------------
# OSDS and DIS


def _flow_nfe(K: int) -> dict:
    """Evaluations per draw of a K-step flow: K network calls; the first step (code T) needs no target
    gradient, so K - 1 target gradients, plus one potential evaluation for the weight."""
    return {"network": K, "target_gradients": K - 1, "potentials": 1}


def _train_flow_sampler(ctx: RunContext, config: OSDSConfig, desc: str) -> tuple[FlowSampler | MixtureSampler, dict]:
    device = ctx.preset.resolved_device()
    target = ctx.target
    potential = potential_on_device(target.potential, device)
    gen = torch.Generator(device=device).manual_seed(ctx.seed)
    init = torch.zeros(target.dim, dtype=D64, device=device)
    t0 = _now()
    sampler = build_sampler(potential, init, config, generator=gen, disable_progbar=True, desc=desc)
    sampler.fit_preconditioner()
    synchronize(device)
    t1 = _now()
    history = sampler.fit()
    synchronize(device)
    t2 = _now()
    n_tail = max(1, len(history["loss"]) // 10)
    finite = [v for v in history["loss"][-n_tail:] if math.isfinite(v)]
    elbos = [v for v in history["elbo"][-n_tail:] if math.isfinite(v)]
    info = {
        "device": str(device),
        "init": "zeros (the engine's preconditioner starts its Laplace / Gaussian fit there)",
        "precondition_s": t1 - t0,
        "train_s": t2 - t1,
        "iterations": len(history["loss"]),
        "seconds_per_iteration": (t2 - t1) / max(len(history["loss"]), 1),
        "final_loss": sum(finite) / len(finite) if finite else math.nan,
        "final_train_elbo": sum(elbos) / len(elbos) if elbos else math.nan,
        "skipped_steps": int(sum(history["skipped"])),
        "precondition_info": _jsonable_search_report(sampler.report),
    }
    return sampler, info


def _jsonable_search_report(report) -> dict:
    """The numbers of a :class:`~pyro_osds.ops.precondition.SearchReport` (the modes as their count and masses)."""
    out = {"num_modes": report.num_modes, "mode_masses": [float(w) for _, w in report.modes],
           "light_modes": report.num_light, "saturated": report.saturated, "search_starts": report.num_starts,
           "marginal_mixture": report.marginal_mixture, "laplace_fits": report.num_laplace_fits}
    if report.fit is not None:
        out["fit"] = {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1
                          else None) for k, v in report.fit.items() if not isinstance(v, (list, tuple))}
    return out


def _evaluate_flow(ctx: RunContext, sampler: FlowSampler, method: str, name: str, budgets: tuple[int, ...],
                   weight_kinds: tuple[str, ...]) -> list[dict]:
    """Evaluations of a trained sampler at each step budget and weight kind (module docstring)."""
    preset = ctx.preset
    n = preset.eval_draws
    device = sampler.device
    entries = []
    for K in budgets:
        for kind in weight_kinds:
            records = []
            quality = (None, None)
            for r in range(preset.repeats(K, kind)):
                try:
                    if kind == "em":
                        t0 = _now()
                        log_w = sampler.em_log_weights(n, K)
                        synchronize(device)
                        rec = _estimate_record(log_w, _now() - t0, log_det="em_path")
                    else:
                        t0 = _now()
                        draws = sampler.draw(n, K, log_det=kind)
                        synchronize(device)
                        rec = _estimate_record(draws.log_weight, _now() - t0, num_folded=draws.num_folded,
                                               log_det=kind)
                        rec["moments"] = _moment_errors(ctx, draws.x, draws.log_weight)
                        if r == 0 and kind == "exact":
                            quality = _quality(ctx, draws.x)
                except (EvidenceError, RuntimeError, ValueError) as err:
                    rec = {"error": _error_text(err)}
                records.append(rec)
            suffix = {"exact": "", "hutchinson": " (EH)", "em": " (EM)"}[kind]
            entry = _evaluation(f"{name} K={K}{suffix}", method, kind, K=K, nfe=K, records=records, ctx=ctx,
                                num_draws=n, extra={"evaluations_per_draw": _flow_nfe(K)})
            entry["sinkhorn"], entry["mmd"] = quality
            if kind == "hutchinson":
                entry["num_probes"] = sampler.config.evaluation.num_probes
            entries.append(entry)
            ctx.log(f"  {entry['label']}: log Z {entry['log_z']['mean']:.3f} +- {entry['log_z']['sd']:.3f}, "
                    f"ELBO {entry['elbo']['mean']:.3f}, ESS/N {entry['ess_per_draw']['mean']:.3g}")
    return entries


def _flow_timings(ctx: RunContext, sampler: FlowSampler, K: int, small: int, large: int) -> dict:
    """Wall clock of ``small`` draws without and with exact weights, and of ``large`` draws without
    weights in chunks of ``timing_chunk``, at step budget ``K``."""
    preset = ctx.preset
    device = sampler.device
    out = {"K": K, "draw_small_n": small, "draw_large_n": large, "draw_large_chunk": preset.timing_chunk}
    t0 = _now()
    sampler.draw(small, K, log_det="none")
    synchronize(device)
    out["draw_small_s"] = _now() - t0
    t0 = _now()
    d = sampler.draw(small, K, log_det="exact")
    synchronize(device)
    out["draw_small_weighted_s"] = _now() - t0
    out["draw_small_weighted_ess"] = metrics.kish_ess_fraction(d.log_weight) * small
    out["ess_per_s"] = metrics.ess_per_second(out["draw_small_weighted_ess"], out["draw_small_weighted_s"])
    t0 = _now()
    left = large
    while left > 0:
        m = min(preset.timing_chunk, left)
        sampler.draw(m, K, log_det="none", chunk_size=m)
        left -= m
    synchronize(device)
    out["draw_large_s"] = _now() - t0
    return out


def _run_flow_method(ctx: RunContext, method: str, config: OSDSConfig, budgets: tuple[int, ...],
                     timing: tuple[int, int, int],
                     weight_kinds: tuple[str, ...] = ("exact", "hutchinson", "em")) -> dict:
    """Trains, evaluates at ``budgets`` and times ``(K, small, large)`` draws of one flow sampler."""
    name = FLOW_LABELS.get(method, method.upper())
    batch = config.objective.flow_kl.batch_size if config.objective.diffusion.weight == 0 else config.objective.diffusion.batch_size
    ctx.log(f"  training {name} ({config.optim.num_iterations} iterations, batch {batch}, T {config.process.grid_size})")
    sampler, train = _train_flow_sampler(ctx, config, name)
    ctx.log(f"  trained in {train['train_s']:.1f} s (+ {train['precondition_s']:.1f} s preconditioning)")
    evaluations = _evaluate_flow(ctx, sampler, method, name, budgets, weight_kinds)
    timings = _flow_timings(ctx, sampler, *timing)
    timings.update(setup_s=train["precondition_s"], train_s=train["train_s"])
    return {"config": {"osds": config.as_dict(), "budgets": list(budgets), "init": train["init"],
                       "device": train["device"]},
            "training": train, "timings": timings, "evaluations": evaluations}


def run_osds(ctx: RunContext) -> dict:
    """
    OSDS with the engine's default objective (the exact reverse KL of the deterministic flow), at the
    step budgets it trains (``flow_kl_steps``) with DF-exact, Euler-Hutchinson and EM weights.
    """
    config = ctx.preset.osds_config()
    preset = ctx.preset
    budgets = config.objective.flow_kl.steps if config.objective.diffusion.weight == 0 else preset.budgets(config.process.grid_size)
    return _run_flow_method(ctx, "osds", config, tuple(budgets),
                            timing=(1, preset.timing_draws, preset.timing_draws_large))


def run_osds_paper(ctx: RunContext) -> dict:
    """OSDS trained with the paper's objective (EM paths + self-distillation + volume consistency) at
    every step budget 1, 2, 4, ..., T, as in the paper's evaluation."""
    config = ctx.preset.paper_config()
    preset = ctx.preset
    return _run_flow_method(ctx, "osds_paper", config, preset.budgets(config.process.grid_size),
                            timing=(1, preset.timing_draws, preset.timing_draws_large))


def run_scds(ctx: RunContext) -> dict:
    """SCDS (self-consistent diffusion sampler) at K = 1 and its fine-grid K = T."""
    config = make_method_config("scds", ctx.preset.paper_config())
    T = config.process.grid_size
    preset = ctx.preset
    return _run_flow_method(ctx, "scds", config, (1, T), timing=(1, preset.timing_draws, preset.timing_draws_large))


def run_cdds(ctx: RunContext) -> dict:
    """CDDS (consistency distillation of a DIS teacher) at K = 1 with exact weights; its multi-step
    consistency draws have no tractable density and are not weighted."""
    config = make_method_config("cdds", ctx.preset.paper_config())
    preset = ctx.preset
    return _run_flow_method(ctx, "cdds", config, (1,), timing=(1, preset.timing_draws, preset.timing_draws_large),
                            weight_kinds=("exact",))


def run_dis(ctx: RunContext) -> dict:
    """The many-step diffusion sampler (:func:`make_dis_config`) at K = T and K = 1."""
    config = make_dis_config(ctx.preset.osds_config())
    T = config.process.grid_size
    preset = ctx.preset
    return _run_flow_method(ctx, "dis", config, (1, T) if T > 1 else (1,),
                            timing=(T, preset.dis_timing_draws, preset.dis_timing_draws_large))


# ---------------------------------------------------------------------------------------------------
# NUTS

#: NUTS settings (Pyro's defaults, written out so that the JSON records them).
NUTS_SETTINGS = {"target_accept_prob": 0.8, "max_tree_depth": 10}


def _unconstrained_flat(target: Target, transforms: dict, values: dict) -> torch.Tensor:
    """Flat unconstrained vectors from constrained site values (``biject_to(support).inv`` per site)."""
    sites = {}
    for name, value in values.items():
        t = transforms.get(name)
        sites[name] = (t(value) if t is not None else value).to(D64)
    return target.from_sites(sites)


def run_nuts(ctx: RunContext) -> dict:
    """Pyro NUTS on ``target.model`` (module docstring); saves its flat draws under ``<out>/draws/``."""
    target, preset = ctx.target, ctx.preset
    calls = [0]

    def counted_model(*args, **kwargs):
        calls[0] += 1
        return target.model(*args, **kwargs)

    pyro.set_rng_seed(ctx.seed)
    pyro.clear_param_store()
    kernel = NUTS(counted_model, target_accept_prob=NUTS_SETTINGS["target_accept_prob"],
                  max_tree_depth=NUTS_SETTINGS["max_tree_depth"], jit_compile=False)
    mcmc = MCMC(kernel, num_samples=preset.nuts_samples, warmup_steps=preset.nuts_warmup, num_chains=1,
                disable_progbar=True)
    ctx.log(f"  NUTS {preset.nuts_warmup} warm-up + {preset.nuts_samples} draws")
    t0 = _now()
    mcmc.run(*target.model_args)
    wall = _now() - t0
    samples = mcmc.get_samples()
    _, _, transforms, _ = initialize_model(target.model, target.model_args)
    flat = _unconstrained_flat(target, transforms, samples).detach()
    ess = metrics.mcmc_ess(flat)
    diag = mcmc.diagnostics()
    divergences = sum(len(v) for v in diag.get("divergences", {}).values())
    with torch.no_grad():
        u = target.potential(flat)
    num_iter = preset.nuts_samples + preset.nuts_warmup
    moments = _moment_errors(ctx, flat, None)
    # the NUTS draws cannot be measured against themselves
    quality = (None, None) if ctx.reference.draws_source.startswith("nuts") else _quality(ctx, flat)
    entry = {
        "label": "NUTS", "method": "nuts", "weights": "mcmc", "K": None,
        "nfe": calls[0] / preset.nuts_samples, "num_draws": int(flat.shape[0]), "repeats": 1, "errors": [],
        "moments": None if moments is None else {k: metrics.mean_sd([v]) for k, v in moments.items()},
        "sinkhorn": quality[0], "mmd": quality[1],
        "ess": ess,
        "ess_per_s": metrics.mean_sd([metrics.ess_per_second(ess["bulk_min"], wall)]),
        "ess_bulk_median_per_s": metrics.ess_per_second(ess["bulk_median"], wall),
        "ess_tail_min_per_s": metrics.ess_per_second(ess["tail_min"], wall),
        "divergences": divergences,
        "mean_accept_prob": float(kernel.logging()["acc. prob"]),  # NUTS's own statistic (target 0.8)
        "step_size": float(kernel.step_size),
        "potential_finite_fraction": float(torch.isfinite(u).double().mean()),
        "evaluations_per_draw": {"model_traces_per_kept_draw": calls[0] / preset.nuts_samples,
                                 "model_traces_per_iteration": calls[0] / num_iter},
    }
    draws_file = None
    if ctx.out_dir is not None:
        folder = Path(ctx.out_dir) / "draws"
        folder.mkdir(parents=True, exist_ok=True)
        draws_file = folder / f"{target.name}__nuts.npy"
        np.save(draws_file, flat.numpy())
    ctx.log(f"  NUTS: {wall:.1f} s, ESS bulk min {ess['bulk_min']:.0f}, {divergences} divergences")
    return {
        "config": {"num_samples": preset.nuts_samples, "warmup_steps": preset.nuts_warmup, "num_chains": 1,
                   **NUTS_SETTINGS, "jit_compile": False, "adapt_mass_matrix": "diagonal",
                   "model": "target.model"},
        "timings": {"train_s": wall, "wall_s": wall, "includes_warmup": True},
        "evaluations": [entry],
        "draws_file": None if draws_file is None else str(draws_file.name),
        "flat_draws": flat,
    }


# ---------------------------------------------------------------------------------------------------
# SVI + importance sampling


def _latent_sites(target: Target) -> list[str]:
    tr = poutine.trace(target.model).get_trace(*target.model_args)
    return [n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


def _guide_importance(target: Target, guide, num_draws: int, transforms: dict) -> tuple[torch.Tensor, torch.Tensor,
                                                                                         str]:
    """Log-weights and flat draws of importance sampling with the guide; vectorised when possible."""
    latent = _latent_sites(target)
    try:
        with torch.no_grad():
            log_w, _, guide_trace = vectorized_importance_weights(
                target.model, guide, *target.model_args, num_samples=num_draws, max_plate_nesting=0,
                normalized=False,
            )
        if log_w.shape != (num_draws,) or not bool(torch.isfinite(log_w).any()):
            raise ValueError(f"vectorised weights have shape {tuple(log_w.shape)}")
        values = {n: guide_trace.nodes[n]["value"] for n in latent}
        return log_w.detach().to(D64), _unconstrained_flat(target, transforms, values).detach(), "vectorized"
    except (RuntimeError, ValueError, IndexError, NotImplementedError):
        pass
    log_ws, flats = [], []
    with torch.no_grad():
        for _ in range(num_draws):
            guide_trace = poutine.trace(guide).get_trace(*target.model_args)
            model_trace = poutine.trace(poutine.replay(target.model, trace=guide_trace)).get_trace(*target.model_args)
            log_ws.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
            flats.append(_unconstrained_flat(target, transforms, {n: guide_trace.nodes[n]["value"] for n in latent}))
    return torch.stack(log_ws).to(D64), torch.stack(flats), "loop"


def run_svi_is(ctx: RunContext) -> dict:
    """SVI with an IAF guide, then importance sampling with the guide (module docstring)."""
    target, preset = ctx.target, ctx.preset
    with _default_dtype(D64):
        pyro.set_rng_seed(ctx.seed)
        pyro.clear_param_store()
        guide = AutoIAFNormal(target.model, num_transforms=preset.svi_num_transforms)
        lrd = 0.1 ** (1.0 / max(preset.svi_steps, 1))
        optim = pyro.optim.ClippedAdam({"lr": preset.svi_lr, "lrd": lrd, "clip_norm": 10.0})
        svi = SVI(target.model, guide, optim, Trace_ELBO(num_particles=preset.svi_particles))
        ctx.log(f"  SVI {preset.svi_steps} steps (AutoIAFNormal, {preset.svi_num_transforms} transforms)")
        losses = []
        t0 = _now()
        for _ in range(preset.svi_steps):
            losses.append(svi.step(*target.model_args))
        train_s = _now() - t0
        _, _, transforms, _ = initialize_model(target.model, target.model_args)
        t0 = _now()
        log_w, flat, mode = _guide_importance(target, guide, preset.svi_is_draws, transforms)
        is_s = _now() - t0
    tail = [v for v in losses[-max(1, len(losses) // 10):] if math.isfinite(v)]
    rec = _estimate_record(log_w, is_s, log_det="is")
    rec["moments"] = _moment_errors(ctx, flat, log_w)
    entry = _evaluation("SVI+IS", "svi_is", "is", K=None, nfe=1, records=[rec], ctx=ctx, num_draws=preset.svi_is_draws,
                        extra={"importance_mode": mode})
    entry["sinkhorn"], entry["mmd"] = _quality(ctx, flat)
    ctx.log(f"  SVI+IS: log Z {rec['log_z']:.3f} +- {rec['se']:.3f}, ESS/N {rec['ess_per_draw']:.3g} ({mode})")
    return {
        "config": {"guide": "AutoIAFNormal", "num_transforms": preset.svi_num_transforms,
                   "hidden_dim": "Pyro default", "optimizer": "ClippedAdam", "lr": preset.svi_lr, "lrd": lrd,
                   "clip_norm": 10.0, "steps": preset.svi_steps, "elbo": "Trace_ELBO",
                   "num_particles": preset.svi_particles, "is_draws": preset.svi_is_draws,
                   "importance": mode},
        "training": {"final_elbo": -sum(tail) / len(tail) if tail else math.nan},
        "timings": {"train_s": train_s, "is_s": is_s, "draw_small_n": preset.svi_is_draws,
                    "draw_small_weighted_s": is_s},
        "evaluations": [entry],
    }


# ---------------------------------------------------------------------------------------------------
# Laplace + importance sampling


def laplace_importance_draws(potential, affine, num_draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_draws`` draws ``x = affine(eps)``, ``eps ~ N(0, I)`` (seeded), and their importance log-weights
    :math:`-U(x) - \\log q(x)` under that Gaussian."""
    dim = affine.shift.numel()
    eps = torch.randn(num_draws, dim, dtype=D64, generator=torch.Generator().manual_seed(seed))
    x = affine(eps)
    with torch.no_grad():
        u = potential(x)
    log_q = -0.5 * (eps**2).sum(-1) - 0.5 * dim * math.log(2 * math.pi) - affine.log_abs_det
    return x, -u - log_q


def run_laplace_is(ctx: RunContext) -> dict:
    """Importance sampling from the Laplace Gaussian of the bare potential (module docstring)."""
    target, preset = ctx.target, ctx.preset
    init = torch.zeros(target.dim, dtype=D64)
    t0 = _now()
    affine, info = fit_laplace(target.potential, init)
    fit_s = _now() - t0
    t0 = _now()
    x, log_w = laplace_importance_draws(target.potential, affine, preset.laplace_draws, ctx.seed)
    is_s = _now() - t0
    try:
        rec = _estimate_record(log_w, is_s, log_det="is")
        rec["moments"] = _moment_errors(ctx, x, log_w)
    except EvidenceError as err:
        rec = {"error": _error_text(err)}
    entry = _evaluation("Laplace IS", "laplace_is", "is", K=None, nfe=1, records=[rec], ctx=ctx,
                        num_draws=preset.laplace_draws)
    entry["sinkhorn"], entry["mmd"] = _quality(ctx, x)
    return {
        "config": {"draws": preset.laplace_draws, "init": "zeros", "fit": "pyro_osds.ops.precondition.fit_laplace"},
        "training": {"converged": bool(info["converged"]), "iterations": int(info["iterations"]),
                     "map_potential": float(info["potential"])},
        "timings": {"train_s": fit_s, "is_s": is_s, "draw_small_n": preset.laplace_draws,
                    "draw_small_weighted_s": is_s},
        "evaluations": [entry],
    }


#: Display names of the flow-based methods.
FLOW_LABELS = {"osds": "OSDS", "osds_paper": "OSDS-paper", "dis": "DIS", "scds": "SCDS", "cdds": "CDDS"}

#: Method name -> runner.
METHODS: dict[str, Callable[[RunContext], dict]] = {
    "nuts": run_nuts,
    "osds": run_osds,
    "dis": run_dis,
    "svi_is": run_svi_is,
    "laplace_is": run_laplace_is,
    "osds_paper": run_osds_paper,
    "scds": run_scds,
    "cdds": run_cdds,
}

#: The methods run by default (the method comparison ``osds_paper``/``scds``/``cdds`` is opt-in:
#: three more trainings of the paper's objective per target).
DEFAULT_METHODS = METHOD_NAMES[:5]


def run_method(name: str, ctx: RunContext) -> dict:
    """
    Runs method ``name`` and returns its result, recording every warning raised during the run and,
    instead of raising, any exception (``status`` ``"error"`` with the traceback).
    """
    t0 = _now()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = METHODS[name](ctx)
            result["status"] = "ok"
        except Exception as err:  # a failed method is a benchmark result, not a crash
            result = {"status": "error", "error": _error_text(err), "traceback": traceback.format_exc(),
                      "evaluations": []}
    counts: dict[tuple[str, str], int] = {}
    for w in caught:
        key = (w.category.__name__, str(w.message)[:400])
        counts[key] = counts.get(key, 0) + 1
    result["warnings"] = [{"category": c, "message": m, "count": n} for (c, m), n in counts.items()]
    result.setdefault("timings", {})["total_s"] = _now() - t0
    return result
