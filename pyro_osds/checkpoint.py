# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The checkpoint format of :class:`~pyro_osds.OSDS`: what a saved run holds, how it is written
(atomically: write to a temporary file, then rename), read (``torch.load(weights_only=True)``: tensors
and plain Python values only, no pickled code runs), checked against the run that resumes it, and
restored.

Checkpoints are read only by the version of ``pyro_osds`` that wrote them.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ._version import __version__
from .config import OSDSConfig
from .results import Draws

__all__ = ["FORMAT", "RESUMABLE_CHANGES", "atomic_save", "check_compatible", "is_plain", "load", "read",
           "restore_draws", "runner_state"]

FORMAT = "pyro_osds.OSDS/3"
#: settings that may differ between a checkpoint and the run that resumes it
RESUMABLE_CHANGES = frozenset({"num_iterations", "chunk_size", "eval_log_det", "exact_log_det_max_dim",
                               "eval_num_probes", "diagnostic_draws", "max_consecutive_skips", "sample_with_ema",
                               "early_stopping", "eval_dtype", "sync_every", "target_se", "max_draws", "max_time",
                               # the sites' check guards the parameterisation: a saved choice is reused on loading
                               "noncentering", "whitening"})


def is_plain(obj) -> bool:
    """Whether ``obj`` can be stored in a ``weights_only`` checkpoint."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(is_plain(o) for o in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in obj.items())
    return False


def atomic_save(state: dict, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file at ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".osds-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path: str | os.PathLike) -> dict:
    """Reads and checks an OSDS checkpoint with ``weights_only=True`` (no pickled code runs)."""
    path = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Could not read an OSDS checkpoint from {path!r}: {type(err).__name__}: {err}. "
                         "The file is truncated, corrupted or not a checkpoint.") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path!r} is not a pyro_osds OSDS checkpoint (format {found!r}, expected {FORMAT!r}).")
    if state.get("version") != __version__:
        raise ValueError(f"{path!r} was written by pyro_osds {state.get('version')}, this is {__version__}; "
                         "checkpoints are only read by the version that wrote them. Retrain, or load it with "
                         f"pyro_osds=={state.get('version')}.")
    return state


def _kind(osds) -> str:
    """``"model"`` or ``"potential"``: what ``osds`` samples."""
    return "model" if osds.model is not None else "potential"


def _site_list(target) -> list:
    return [[s.name, list(s.shape)] for s in target.sites]


def runner_state(osds) -> dict:
    """Everything :meth:`~pyro_osds.OSDS.save` writes for a fitted ``osds``."""
    state = {
        "format": FORMAT,
        "version": __version__,
        "kind": _kind(osds),
        "config": osds.config.as_dict(),
        "num_samples": osds.num_samples,
        "num_chains": osds.num_chains,
        "num_steps": osds.num_steps,
        "dim": osds.target.dim,
        "sites": _site_list(osds.target),
        "noncentered_sites": list(osds.target.noncentered_sites),
        "whitened_sites": list(osds.target.whitened_sites),
        "whitening_form": _whitening_form(osds.target),
        "chain_seeds": list(osds.chain_seeds),
        "samplers": [s.state_dict() for s in osds.samplers],
        "draws": [
            {"x": d.x, "potential": d.potential, "log_q": d.log_q, "log_weight": d.log_weight,
             "orientation": d.orientation, "log_det": d.log_det, "discrete": d.discrete, "component": d.component}
            for d in osds.draws
        ],
    }
    if osds.model is not None and is_plain(list(osds.model_args)) and is_plain(osds.model_kwargs):
        state["model_args"] = list(osds.model_args)
        state["model_kwargs"] = dict(osds.model_kwargs)
    if osds.model is None:
        state["initial_params"] = {k: v.detach().cpu() for k, v in osds.initial_params.items()}
    return state


def _whitening_form(target) -> str | None:
    """How a target's whitened block is mapped: ``"quadratic"`` (one reading of its curvature), ``"laplace"`` (Newton
    steps to the conditional mode) or ``None`` (no block)."""
    block = getattr(target, "block", None)
    if not target.whitened_sites or block is None:
        return None
    return "quadratic" if block.newton_steps == 1 else "laplace"


def _check_whitening_form(state: dict, target) -> None:
    """Raises ``ValueError`` unless ``target`` maps its whitened block as the run saved in ``state`` did (a checkpoint
    from before the Laplace form whitened quadratic blocks only), so saved draws are read through their own map."""
    saved = state.get("whitening_form", "quadratic" if state.get("whitened_sites") else None)
    mine = _whitening_form(target)
    if saved != mine:
        raise ValueError(f"The checkpoint's whitened sites {state.get('whitened_sites', [])} were drawn in the "
                         f"{saved} form, this model's in the {mine} form (the model changed, or the checkpoint comes "
                         "from another version of pyro_osds): its draws cannot be read through this map.")


def check_compatible(state: dict, osds) -> None:
    """Raises ``ValueError`` unless ``osds`` (with its target built) can resume from ``state``."""
    if state["kind"] != _kind(osds):
        raise ValueError(f"The checkpoint was made for a {state['kind']}, not a {_kind(osds)}.")
    sites = _site_list(osds.target)
    saved_sites = [[name, list(shape)] for name, shape in state["sites"]]
    if sites != saved_sites:
        raise ValueError(f"The checkpoint's latent sites {saved_sites} do not match this model's {sites}; "
                         "it was saved from a different model.")
    whitened, saved_whitened = list(osds.target.whitened_sites), list(state.get("whitened_sites", []))
    if whitened != saved_whitened:  # same sites, other coordinates: the saved draws would be read through another map
        raise ValueError(f"The checkpoint's sites drawn whitened {saved_whitened} differ from this run's {whitened}; "
                         f"resume with `whitening={tuple(saved_whitened) or 'none'!r}`, or load it with `OSDS.load`.")
    _check_whitening_form(state, osds.target)
    mine = osds.config.as_dict()
    diffs = {k: (state["config"].get(k), v) for k, v in mine.items()
             if k not in RESUMABLE_CHANGES and state["config"].get(k) != v}
    if diffs:
        raise ValueError(
            "The checkpoint was trained with different settings, which cannot be resumed: "
            + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diffs.items())
            + f". Only {sorted(RESUMABLE_CHANGES)} may change."
        )
    if state["num_chains"] != osds.num_chains:
        raise ValueError(f"The checkpoint has {state['num_chains']} chains, this run asks for {osds.num_chains}.")


def restore_draws(state: dict, device) -> tuple[Draws, ...]:
    """The draws stored in ``state``, on ``device`` (the log-weights stay float64 on the CPU)."""

    def to(t):
        return None if t is None else t.to(device)

    return tuple(
        Draws(to(d["x"]), to(d["potential"]), to(d["log_q"]), d["log_weight"], to(d["orientation"]), d["log_det"],
              d.get("discrete"), d.get("component"))
        for d in state["draws"]
    )


def load(cls, path: str | os.PathLike, model=None, potential_fn=None, *, model_args: tuple | None = None,
         model_kwargs: dict | None = None, **kwargs):
    """:meth:`OSDS.load <pyro_osds.OSDS.load>` for the runner class ``cls``."""
    state = read(path)
    if (model is None) == (potential_fn is None):
        raise ValueError("Only one of `model` or `potential_fn` must be specified.")
    kind = "model" if model is not None else "potential"
    if state["kind"] != kind:
        raise ValueError(f"The checkpoint was made for a {state['kind']}, not a {kind}.")
    init_params = kwargs.pop("initial_params", None) or state.get("initial_params")
    config = OSDSConfig(**state["config"])
    if kind == "model":  # the parameterisation the run chose, not a new choice (on another device, say)
        config = config.replace(noncentering=tuple(state["noncentered_sites"]) or "none",
                                whitening=tuple(state.get("whitened_sites", ())) or "none")
    osds = cls(model, potential_fn, initial_params=init_params, num_samples=state["num_samples"],
               num_chains=state["num_chains"], config=config, **kwargs)
    osds.num_steps = state["num_steps"]
    args, kw = (), {}
    if kind == "model":
        if model_args is None and model_kwargs is None:
            if "model_args" not in state:
                raise ValueError("The checkpoint does not hold the model's data (they were not plain tensors); "
                                 "pass `model_args=` / `model_kwargs=`.")
            model_args, model_kwargs = tuple(state["model_args"]), state["model_kwargs"]
        args, kw = tuple(model_args or ()), dict(model_kwargs or {})
    osds.setup(*args, **kw)
    osds.load_state_dict(state)
    return osds
