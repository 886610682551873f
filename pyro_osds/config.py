# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
All hyper-parameters of :class:`~pyro_osds.OSDS`, nested by owner, with named presets.

:class:`OSDSConfig` holds one validated part per owner, each defined next to the code that uses it:

==================  =======================================================  ==========================
part                class                                                    used by
==================  =======================================================  ==========================
``process``         :class:`~pyro_osds.ops.reference.ReferenceProcess`       the integrators, the prior
``net``             :class:`~pyro_osds.ops.nets.NetConfig`                   the control network
``optim``           :class:`~pyro_osds.train.OptimConfig`                    the trainer
``objective``       :class:`~pyro_osds.objectives.ObjectiveConfig`           the training objective
``preconditioner``  :class:`~pyro_osds.ops.precondition.PreconditionConfig`  the affine preconditioner
``evaluation``      :class:`~pyro_osds.transports.EvaluationConfig`          drawing and weighting
``budget``          :class:`~pyro_osds.budget.BudgetConfig`                  the runner's evidence budget
``reparam``         :class:`~pyro_osds.reparam.NoncenteringConfig`           the model's parameterisation
==================  =======================================================  ==========================

The flat keyword front door stays: ``OSDSConfig(num_iterations=3000, grid_size=64)``,
``config.replace(learning_rate=1e-3)`` and ``OSDS(model, num_iterations=3000)`` route every option to
its part (:data:`FLAT_OPTIONS`); unknown names raise ``TypeError`` with the closest valid names.
``OSDSConfig.preset("paper")`` starts from a named preset (:data:`PRESETS`) and
``OSDSConfig.for_method("dis")`` from a method's defaults (:data:`METHOD_DEFAULTS`).

**Training objectives.** Two objectives, which can be combined:

* the **one-step objective** (default, ``flow_kl_weight=1``, ``diffusion_weight=0``; beyond the
  paper): the ``flow_kl_steps``-step deterministic flows are trained directly on their exact
  reverse KL, :math:`-\mathbb E[\log w_{\rm DF}]`, the quantity the evidence uses
  (:func:`pyro_osds.ops.losses.flow_kl_loss`); cheap on a CPU and much better at :math:`K = 1`;
* the **paper's objective** (``diffusion_weight=1``; presets ``"paper"`` and ``"paper-cpu"``):
  the diffusion-sampler loss on fine-grid EM paths plus self-distillation with volume
  consistency and a Jacobian penalty (:mod:`pyro_osds.ops.losses`), which trains every step size.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from .budget import BudgetConfig
from .objectives import ConsistencyConfig, DiffusionConfig, FlowKLConfig, ObjectiveConfig
from .ops.nets import NetConfig
from .ops.precondition import PreconditionConfig
from .ops.reference import ReferenceProcess
from .reparam import NoncenteringConfig
from .train import OptimConfig
from .transports import EvaluationConfig
from .util import check_choice

__all__ = ["FLAT_OPTIONS", "METHODS", "METHOD_DEFAULTS", "OSDSConfig", "PRESETS", "check_option_names"]

METHODS = ("osds", "scds", "cdds", "dis")

#: Every flat option name and where it lives: ``(part, field)`` or ``(part, sub-part, field)``, in the
#: order of :meth:`OSDSConfig.as_dict`.
FLAT_OPTIONS: dict[str, tuple[str, ...]] = {
    # reference process
    "grid_size": ("process", "grid_size"),
    "schedule": ("process", "schedule"),
    "sigma_min": ("process", "sigma_min"),
    "sigma_max": ("process", "sigma_max"),
    "cosine_s": ("process", "cosine_s"),
    "prior_scale": ("process", "prior_scale"),
    "prior_clip": ("process", "prior_clip"),
    "langevin_time": ("process", "langevin_time"),
    # network
    "hidden_dim": ("net", "hidden_dim"),
    "num_layers": ("net", "num_layers"),
    "num_frequencies": ("net", "num_frequencies"),
    "max_frequency": ("net", "max_frequency"),
    "inner_clip": ("net", "inner_clip"),
    "outer_clip": ("net", "outer_clip"),
    "activation": ("net", "activation"),
    "dtype": ("net", "dtype"),
    # optimisation
    "num_iterations": ("optim", "num_iterations"),
    "learning_rate": ("optim", "learning_rate"),
    "lr_schedule": ("optim", "lr_schedule"),
    "weight_decay": ("optim", "weight_decay"),
    "grad_clip": ("optim", "grad_clip"),
    "ema_decay": ("optim", "ema_decay"),
    "sample_with_ema": ("optim", "sample_with_ema"),
    "max_consecutive_skips": ("optim", "max_consecutive_skips"),
    "sync_every": ("optim", "sync_every"),
    # the one-step objective
    "flow_kl_weight": ("objective", "flow_kl", "weight"),
    "flow_kl_steps": ("objective", "flow_kl", "steps"),
    "flow_kl_batch_size": ("objective", "flow_kl", "batch_size"),
    "fold_weight": ("objective", "flow_kl", "fold_weight"),
    "flow_kl_gradient": ("objective", "flow_kl", "gradient"),
    "path_gradient_cutoff": ("objective", "flow_kl", "path_cutoff"),
    "flow_kl_tempering": ("objective", "flow_kl", "tempering"),
    "early_stopping": ("objective", "flow_kl", "early_stop"),
    # the paper's objective
    "diffusion_weight": ("objective", "diffusion", "weight"),
    "batch_size": ("objective", "diffusion", "batch_size"),
    "diffusion_loss": ("objective", "diffusion", "loss"),
    "sd_weight": ("objective", "diffusion", "sd_weight"),
    "sd_warmup": ("objective", "diffusion", "sd_warmup"),
    "volume_weight": ("objective", "diffusion", "volume_weight"),
    "jacobian_weight": ("objective", "diffusion", "jacobian_weight"),
    "train_log_det": ("objective", "diffusion", "train_log_det"),
    "num_probes": ("objective", "diffusion", "num_probes"),
    "sd_teacher": ("objective", "diffusion", "sd_teacher"),
    # consistency distillation (method="cdds")
    "consistency_iterations": ("objective", "consistency", "num_iterations"),
    "consistency_points": ("objective", "consistency", "num_points"),
    "consistency_sigma_data": ("objective", "consistency", "sigma_data"),
    # preconditioning
    "precondition": ("preconditioner", "kind"),
    "precondition_iterations": ("preconditioner", "num_iterations"),
    "mode_search_starts": ("preconditioner", "mode_search_starts"),
    "mode_search_scale": ("preconditioner", "mode_search_scale"),
    "components": ("preconditioner", "components"),
    "max_components": ("preconditioner", "max_components"),
    "marginal_components": ("preconditioner", "marginal_components"),
    "gaussian_fit": ("preconditioner", "gaussian_fit"),
    "natural_iterations": ("preconditioner", "natural_iterations"),
    "precondition_tails": ("preconditioner", "tails"),
    # evaluation
    "num_steps": ("evaluation", "num_steps"),
    "eval_log_det": ("evaluation", "log_det"),
    "exact_log_det_max_dim": ("evaluation", "exact_log_det_max_dim"),
    "eval_num_probes": ("evaluation", "num_probes"),
    "chunk_size": ("evaluation", "chunk_size"),
    "eval_dtype": ("evaluation", "dtype"),
    "diagnostic_draws": ("evaluation", "diagnostic_draws"),
    # the evidence budget
    "target_se": ("budget", "target_se"),
    "max_draws": ("budget", "max_draws"),
    "max_time": ("budget", "max_time"),
    # the model's parameterisation
    "noncentering": ("reparam", "sites"),
    "noncentering_iterations": ("reparam", "num_iterations"),
    "noncentering_batch_size": ("reparam", "batch_size"),
    "noncentering_max_flips": ("reparam", "max_flips"),
    "whitening": ("reparam", "whitening"),
    "whitening_max_dim": ("reparam", "whitening_max_dim"),
}

_PARTS = {"process": ReferenceProcess, "net": NetConfig, "optim": OptimConfig, "objective": ObjectiveConfig,
          "preconditioner": PreconditionConfig, "evaluation": EvaluationConfig, "budget": BudgetConfig,
          "reparam": NoncenteringConfig}
_SUB_PARTS = {"flow_kl": FlowKLConfig, "diffusion": DiffusionConfig, "consistency": ConsistencyConfig}


def check_option_names(options: dict) -> None:
    """Raises ``TypeError`` naming unknown options, with the closest valid names."""
    valid = ("method",) + tuple(FLAT_OPTIONS)
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"Unknown OSDS option {name!r}.{hint} Valid options: {', '.join(valid)}.")


def _route(parts: dict, options: dict) -> dict:
    """``parts`` (part name -> unvalidated field dict) with the flat ``options`` written in."""
    for name, value in options.items():
        *path, leaf = FLAT_OPTIONS[name]
        target = parts
        for key in path:
            target = target[key]
        target[leaf] = value
    return parts


def _fields(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@dataclass(frozen=True, init=False)
class OSDSConfig:
    r"""
    All hyper-parameters of :class:`~pyro_osds.OSDS` (module docstring), one validated part per owner.

    :param str method: ``"osds"`` (default), ``"dis"``, ``"scds"`` or ``"cdds"`` (see
        :data:`METHOD_DEFAULTS`); settings a method does not use are refused.
    :param ReferenceProcess process: the reference process (grid, schedule, prior).
    :param NetConfig net: the control network.
    :param OptimConfig optim: the optimiser.
    :param ObjectiveConfig objective: the training objective.
    :param PreconditionConfig preconditioner: the affine preconditioner.
    :param EvaluationConfig evaluation: drawing and weighting.
    :param BudgetConfig budget: the evidence budget (a target SE, a cap on the draws, a time limit).
    :param NoncenteringConfig reparam: which hierarchical sites the model draws non-centred, and which
        conditionally Gaussian ones whitened.
    :param options: flat options (:data:`FLAT_OPTIONS`), applied on top of the parts.
    """

    method: str
    process: ReferenceProcess
    net: NetConfig
    optim: OptimConfig
    objective: ObjectiveConfig
    preconditioner: PreconditionConfig
    evaluation: EvaluationConfig
    budget: BudgetConfig
    reparam: NoncenteringConfig

    def __init__(self, method: str = "osds", *, process: ReferenceProcess | None = None, net: NetConfig | None = None,
                 optim: OptimConfig | None = None, objective: ObjectiveConfig | None = None,
                 preconditioner: PreconditionConfig | None = None, evaluation: EvaluationConfig | None = None,
                 budget: BudgetConfig | None = None, reparam: NoncenteringConfig | None = None, **options):
        check_option_names(options)
        given = {"process": process, "net": net, "optim": optim, "objective": objective,
                 "preconditioner": preconditioner, "evaluation": evaluation, "budget": budget,
                 "reparam": reparam}
        for name, part in given.items():
            if part is not None and not isinstance(part, _PARTS[name]):
                raise TypeError(f"`{name}` must be a {_PARTS[name].__name__}, got {type(part).__name__}.")
        parts = {name: _fields(part) if part is not None else {} for name, part in given.items()}
        if not options:
            values = {name: given[name] or _PARTS[name]() for name in _PARTS}
        else:
            objective_parts = {name: _fields(getattr(objective, name)) if objective is not None else {}
                               for name in _SUB_PARTS}
            parts["objective"] = objective_parts
            _route(parts, options)
            values = {name: _PARTS[name](**fields) for name, fields in parts.items() if name != "objective"}
            values["objective"] = ObjectiveConfig(**{k: _SUB_PARTS[k](**v) for k, v in objective_parts.items()})
        object.__setattr__(self, "method", method)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        self._check_across_parts()

    def _check_across_parts(self) -> None:
        """The constraints between parts (each part has validated itself)."""
        check_choice("method", self.method, METHODS)
        grid_size = self.process.grid_size
        if self.evaluation.num_steps is not None:
            self.process.step_codes(self.evaluation.num_steps)  # a divisor of the grid
        steps = self.objective.flow_kl.steps
        if any(grid_size % k for k in steps):
            raise ValueError(f"`flow_kl_steps` must be a non-empty tuple of step counts dividing `grid_size`="
                             f"{grid_size}, got {steps!r}.")
        diffusion = self.objective.diffusion
        rules = {
            "dis": {"sd_weight": 0.0, "flow_kl_weight": 0.0},
            "scds": {"volume_weight": 0.0, "jacobian_weight": 0.0, "flow_kl_weight": 0.0, "sd_teacher": "current"},
            "cdds": {"sd_weight": 0.0, "flow_kl_weight": 0.0},
        }.get(self.method, {})
        wrong = {k: self.option(k) for k, v in rules.items() if self.option(k) != v}
        if wrong:
            raise ValueError(
                f"method={self.method!r} does not use "
                + ", ".join(f"`{k}`={v!r}" for k, v in wrong.items())
                + f" (it needs {', '.join(f'{k}={rules[k]!r}' for k in wrong)}); use method='osds' to combine "
                "objectives freely."
            )
        if self.method in ("dis", "scds", "cdds") and diffusion.weight <= 0:
            raise ValueError(f"method={self.method!r} is trained by the diffusion-sampler loss: `diffusion_weight` "
                             "must be positive.")
        if self.method == "scds" and diffusion.sd_weight <= 0:
            raise ValueError("method='scds' is defined by its self-consistency loss: `sd_weight` must be positive.")
        if diffusion.sd_weight > 0 and grid_size % 2:
            raise ValueError(
                f"Self-distillation (`sd_weight` > 0) needs an even `grid_size`, got {grid_size}; "
                "use a power of two such as 32 or 128, or set `sd_weight=0`."
            )

    # ------------------------------------------------------------------------------------------
    # the flat front door
    def option(self, name: str):
        """The value of the flat option ``name`` (:data:`FLAT_OPTIONS`)."""
        if name == "method":
            return self.method
        check_option_names({name: None})
        value = self
        for key in FLAT_OPTIONS[name]:
            value = getattr(value, key)
        return value

    def as_dict(self) -> dict:
        """All settings as flat options (``method`` first, then :data:`FLAT_OPTIONS`' order)."""
        return {"method": self.method, **{name: self.option(name) for name in FLAT_OPTIONS}}

    @property
    def default_num_steps(self) -> int:
        """The flow step count :math:`K` of draws: ``num_steps`` if set, else ``grid_size`` for ``method="dis"``
        (the many-step sampler), else 1."""
        if self.evaluation.num_steps is not None:
            return self.evaluation.num_steps
        return self.process.grid_size if self.method == "dis" else 1

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The flat option names (with ``method``)."""
        return ("method",) + tuple(FLAT_OPTIONS)

    def replace(self, **changes) -> OSDSConfig:
        """A validated copy with ``changes`` (flat options or whole parts); unknown names raise ``TypeError``
        with suggestions."""
        parts = {name: getattr(self, name) for name in _PARTS}
        method = changes.pop("method", self.method)
        for name in _PARTS:
            if name in changes:
                parts[name] = changes.pop(name)
        return OSDSConfig(method, **parts, **changes)

    @classmethod
    def for_method(cls, method: str, base: OSDSConfig | None = None, **changes) -> OSDSConfig:
        """``base`` (default: the defaults) switched to ``method`` with its defaults
        (:data:`METHOD_DEFAULTS`), then ``changes``."""
        check_choice("method", method, METHODS)
        check_option_names(changes)
        base = cls() if base is None else base
        values = {**base.as_dict(), **METHOD_DEFAULTS[method], "method": method, **changes}
        return cls(**values)

    @classmethod
    def resolve(cls, *, preset: str | None = None, config: OSDSConfig | None = None, method: str | None = None,
                **options) -> OSDSConfig:
        """The configuration :class:`~pyro_osds.OSDS` asks for: at most one of a ``preset`` name and a
        ``config`` (default: the defaults), switched to ``method`` with its defaults when it differs, then
        the flat ``options``, with ``num_steps`` set (:attr:`default_num_steps`)."""
        if preset is not None and config is not None:
            raise ValueError("Give at most one of `preset` and `config`.")
        check_option_names(options)
        base = cls.preset(preset) if preset is not None else (config or cls())
        if not isinstance(base, OSDSConfig):
            raise TypeError(f"`config` must be an OSDSConfig, got {type(base).__name__}.")
        if method is not None and method != base.method:
            config = cls.for_method(method, base, **options)
        else:
            config = base.replace(**options)
        if config.evaluation.num_steps is None:
            config = config.replace(num_steps=config.default_num_steps)
        return config

    @classmethod
    def preset(cls, name: str, **changes) -> OSDSConfig:
        """A named preset (see :data:`PRESETS`), optionally modified by ``changes``."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls().replace(**PRESETS[name]).replace(**changes)


#: The paper's training objective with the CPU budget of the defaults (see :class:`OSDSConfig`).
_PAPER_OBJECTIVE = dict(diffusion_weight=1.0, flow_kl_weight=0.0, learning_rate=1e-3, lr_schedule="constant",
                        grad_clip=1.0, sample_with_ema=True)

#: Defaults each method sets on top of the base configuration (user options override them):
#:
#: ============  ==========================================================================================
#: ``"osds"``    the engine as configured (default: the one-step objective; ``preset="paper-cpu"``: the
#:               OSDS paper's EM loss + self-distillation with an EMA teacher + volume consistency)
#: ``"dis"``     the plain many-step diffusion sampler: the diffusion loss only (log-variance), drawn with
#:               ``num_steps = grid_size``
#: ``"scds"``    self-consistent diffusion sampler (SCDS): diffusion loss (log-variance) + state
#:               self-consistency with the *current* network as teacher, weight 1, no warm-up, no volume
#:               term
#: ``"cdds"``    consistency-distilled diffusion sampler: a DIS teacher, then a consistency function
#:               distilled from its probability-flow ODE (:mod:`pyro_osds.ops.consistency`)
#: ============  ==========================================================================================
METHOD_DEFAULTS: dict[str, dict] = {
    "osds": {},
    "dis": dict(diffusion_weight=1.0, diffusion_loss="lv", sd_weight=0.0, flow_kl_weight=0.0, learning_rate=1e-3,
                lr_schedule="constant", grad_clip=1.0, sample_with_ema=True),
    "scds": dict(diffusion_weight=1.0, diffusion_loss="lv", sd_weight=1.0, sd_warmup=0, volume_weight=0.0,
                 jacobian_weight=0.0, sd_teacher="current", flow_kl_weight=0.0, learning_rate=1e-3,
                 lr_schedule="constant", grad_clip=1.0, sample_with_ema=True),
    "cdds": dict(diffusion_weight=1.0, diffusion_loss="lv", sd_weight=0.0, flow_kl_weight=0.0, learning_rate=1e-3,
                 lr_schedule="constant", grad_clip=1.0, sample_with_ema=True, ema_decay=0.0),
}

#: Named presets. ``"cpu"`` equals the defaults (the one-step objective); ``"paper-cpu"`` is the
#: paper's objective at a CPU budget; ``"paper"`` the OSDS code's objective and budget (for a GPU:
#: 60k iterations, batch 1024, T = 128); ``"smoke"`` is a seconds-long run for tests and smoke modes.
PRESETS: dict[str, dict] = {
    "cpu": {},
    "paper-cpu": dict(_PAPER_OBJECTIVE),
    "paper": dict(
        _PAPER_OBJECTIVE, grid_size=128, num_iterations=60_000, batch_size=1024, learning_rate=5e-4,
        weight_decay=0.1, ema_decay=0.999, sd_warmup=2500, chunk_size=8192, activation="gelu", dtype=None,
    ),
    "smoke": dict(grid_size=16, num_iterations=30, batch_size=32, sd_warmup=10, precondition_iterations=50,
                  natural_iterations=10, hidden_dim=32, mode_search_starts=2, flow_kl_batch_size=64,
                  consistency_iterations=30, consistency_points=9),
}
