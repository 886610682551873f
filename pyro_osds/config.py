# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Hyper-parameters of the OSDS sampler and trainer, validated once, with named presets.

``OSDSConfig()`` gives the CPU defaults; ``OSDSConfig.preset("paper")`` the OSDS code's budget
(60k iterations, batch 1024, T = 128); ``config.replace(name=value)`` returns a validated copy.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from .integrate import LOG_DET_METHODS
from .losses import DIFFUSION_LOSSES, FLOW_KL_GRADIENTS
from .nets import ACTIVATIONS
from .reference import SCHEDULES

__all__ = ["METHODS", "METHOD_DEFAULTS", "OSDSConfig", "PRESETS", "PRECONDITIONERS"]

PRECONDITIONERS = ("gaussian", "laplace", "diagonal_laplace", "none")
METHODS = ("osds", "scds", "cdds", "dis")


def _positive_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _number(name, value, *, low=None, high=None, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


@dataclass(frozen=True)
class OSDSConfig:
    r"""
    All hyper-parameters of :class:`~pyro_osds.OSDS`.

    **Training objectives.** Two objectives, which can be combined:

    * the **one-step objective** (default, ``flow_kl_weight=1``, ``diffusion_weight=0``; beyond the
      paper): the ``flow_kl_steps``-step deterministic flows are trained directly on their exact
      reverse KL, :math:`-\mathbb E[\log w_{\rm DF}]`, the quantity the evidence uses
      (:func:`pyro_osds.losses.flow_kl_loss`); cheap on a CPU and much better at :math:`K = 1`;
    * the **paper's objective** (``diffusion_weight=1``; presets ``"paper"`` and ``"paper-cpu"``):
      the diffusion-sampler loss on fine-grid EM paths plus self-distillation with volume
      consistency and a Jacobian penalty (:mod:`pyro_osds.losses`), which trains every step size.

    **Reference process** -- ``grid_size`` :math:`T` (32; the paper's 128), ``schedule``
    (``"cosine"``), ``sigma_min`` (0.01), ``sigma_max`` (10), ``cosine_s`` (0.008), ``prior_scale``
    :math:`\sigma_0` (1, in the preconditioned space), ``prior_clip`` (4: training draws only),
    ``langevin_time`` (``"start"``, the paper's; ``"end"`` gives one-step maps the target's score,
    see :class:`~pyro_osds.reference.ReferenceProcess`).

    **Network** -- ``hidden_dim`` (64), ``num_layers`` (2), ``num_frequencies`` (64),
    ``max_frequency`` (100), ``inner_clip`` (100), ``outer_clip`` (1e4), ``activation``
    (``"silu"``; the paper's GELU is 3x slower on CPU and available as ``"gelu"``), ``dtype`` of the
    network and flow (``"float32"``, 2-3x faster than float64 on CPU; ``None``: the model's; the
    potential is always evaluated in the model's own dtype).

    **Optimisation** -- ``num_iterations`` (800; paper 60 000), ``learning_rate`` (5e-3; paper 5e-4)
    with ``lr_schedule`` (``"cosine"``, decaying to a tenth; paper ``"constant"``), ``weight_decay``
    (0.01; paper 0.1), ``grad_clip`` (10, global norm; paper 1), ``ema_decay`` (0.995; paper 0.999) of
    the EMA network, which is also the self-distillation teacher; ``sample_with_ema`` (False; paper
    True) draws with the EMA network; ``max_consecutive_skips`` (training stops with an error after
    this many non-finite steps in a row).

    **One-step objective** -- ``flow_kl_weight`` (1), ``flow_kl_steps`` (``(1,)``; the step counts
    trained, cycled; :class:`~pyro_osds.OSDS` adds its ``num_steps``), ``flow_kl_batch_size`` (256),
    ``fold_weight`` (1; folded draws leave the reverse-KL mean and pay
    :func:`~pyro_osds.integrate.fold_penalty` instead, 0 turns this off), ``flow_kl_gradient``:
    the gradient estimator, ``"path"`` (sticking the landing: lower variance near the optimum,
    measured ESS/N 0.62 -> 0.81 on Ionosphere at the same budget), ``"total"`` (plain
    reparameterisation, which did better on the 9-mode mixture) or ``"auto"`` (default: ``"total"``
    when the mode search found several modes, else ``"path"``), with ``path_gradient_cutoff`` (5:
    draws whose path direction exceeds this many batch-median norms of the target's score, i.e. draws
    near a fold, keep the total gradient; ``None``: none does; see :func:`~pyro_osds.losses.flow_kl_loss`).

    **Paper's objective** -- ``diffusion_weight`` (0; paper 1; 0 turns the EM-path loss and the
    self-distillation off), ``batch_size`` of the EM paths (128; paper 1024), ``diffusion_loss``
    (``"kl"`` or ``"lv"``), ``sd_weight`` (0.25) with a linear ``sd_warmup`` (100; paper 2500),
    ``volume_weight`` (0.25), ``jacobian_weight`` (1e-4), ``train_log_det`` (``"hutchinson"``, the
    volume estimator inside the distillation loss), ``num_probes`` (1).

    **Preconditioning** -- ``precondition``: ``"gaussian"`` (Gaussian variational fit started from
    the best of the converged Laplace fits and the identity; default), ``"laplace"`` (the heaviest
    converged Laplace fit), ``"diagonal_laplace"`` (its marginal standard deviations) or ``"none"``; ``precondition_iterations`` for the Gaussian fit; ``mode_search_starts``
    (4): extra random starts of a mode search that, when it finds several separated modes, replaces
    the (mode-seeking) Gaussian fit by a broad Gaussian covering all of them, with a warning.

    **Evaluation** -- ``eval_log_det``: ``"exact"`` (default; exact log-det of the discrete map
    through the Langevin term), or an approximate method for comparison;
    ``exact_log_det_max_dim``: above this dimension the default switches to Hutchinson and the
    estimate says so; ``chunk_size``: draws per batch when sampling/evaluating.
    """

    method: str = "osds"
    # reference process
    grid_size: int = 32
    schedule: str = "cosine"
    sigma_min: float = 0.01
    sigma_max: float = 10.0
    cosine_s: float = 0.008
    prior_scale: float = 1.0
    prior_clip: float | None = 4.0
    langevin_time: str = "start"
    # network
    hidden_dim: int = 64
    num_layers: int = 2
    num_frequencies: int = 64
    max_frequency: float = 100.0
    inner_clip: float = 100.0
    outer_clip: float = 1e4
    activation: str = "silu"
    dtype: str | None = "float32"
    # optimisation
    num_iterations: int = 800
    learning_rate: float = 5e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    ema_decay: float = 0.995
    sample_with_ema: bool = False
    max_consecutive_skips: int = 50
    # one-step objective
    flow_kl_weight: float = 1.0
    flow_kl_steps: tuple = (1,)
    flow_kl_batch_size: int = 256
    fold_weight: float = 1.0
    flow_kl_gradient: str = "auto"
    path_gradient_cutoff: float | None = 5.0
    # the paper's objective
    diffusion_weight: float = 0.0
    batch_size: int = 128
    diffusion_loss: str = "kl"
    sd_weight: float = 0.25
    sd_warmup: int = 100
    volume_weight: float = 0.25
    jacobian_weight: float = 1e-4
    train_log_det: str = "hutchinson"
    num_probes: int = 1
    sd_teacher: str = "ema"
    # consistency distillation (method="cdds")
    consistency_iterations: int = 1000
    consistency_points: int = 18
    consistency_sigma_data: float = 0.5
    # preconditioning
    precondition: str = "gaussian"
    precondition_iterations: int = 400
    mode_search_starts: int = 4
    # evaluation
    eval_log_det: str = "exact"
    exact_log_det_max_dim: int = 128
    eval_num_probes: int = 16
    chunk_size: int = 2048

    def __post_init__(self):
        for name in ("grid_size", "hidden_dim", "num_layers", "num_frequencies", "batch_size", "num_probes",
                     "max_consecutive_skips", "exact_log_det_max_dim", "eval_num_probes", "chunk_size"):
            _positive_int(name, getattr(self, name))
        for name in ("num_iterations", "sd_warmup", "precondition_iterations", "mode_search_starts",
                     "consistency_iterations"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.batch_size < 2:
            raise ValueError(f"`batch_size` must be at least 2, got {self.batch_size!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}.")
        for name in ("sigma_min", "sigma_max", "prior_scale", "learning_rate", "grad_clip", "max_frequency",
                     "inner_clip", "outer_clip"):
            _number(name, getattr(self, name), low=0, low_open=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"Need `sigma_min` < `sigma_max`, got {self.sigma_min!r} and {self.sigma_max!r}.")
        _number("cosine_s", self.cosine_s, low=0)
        if self.prior_clip is not None:
            _number("prior_clip", self.prior_clip, low=0, low_open=True)
        _positive_int("flow_kl_batch_size", self.flow_kl_batch_size, minimum=2)
        steps = self.flow_kl_steps
        if (not isinstance(steps, (tuple, list)) or not steps
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or self.grid_size % k for k in steps)):
            raise ValueError(f"`flow_kl_steps` must be a non-empty tuple of step counts dividing `grid_size`="
                             f"{self.grid_size}, got {steps!r}.")
        object.__setattr__(self, "flow_kl_steps", tuple(steps))
        for name in ("weight_decay", "sd_weight", "volume_weight", "jacobian_weight", "flow_kl_weight",
                     "diffusion_weight", "fold_weight"):
            _number(name, getattr(self, name), low=0)
        _number("ema_decay", self.ema_decay, low=0, high=1)
        if self.dtype not in (None, "float32", "float64"):
            raise ValueError(f"`dtype` must be None, 'float32' or 'float64', got {self.dtype!r}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if self.langevin_time not in ("start", "end"):
            raise ValueError(f"`langevin_time` must be 'start' or 'end', got {self.langevin_time!r}.")
        if self.flow_kl_gradient not in ("auto",) + FLOW_KL_GRADIENTS:
            raise ValueError(f"`flow_kl_gradient` must be one of {('auto',) + FLOW_KL_GRADIENTS}, "
                             f"got {self.flow_kl_gradient!r}.")
        if self.path_gradient_cutoff is not None:
            _number("path_gradient_cutoff", self.path_gradient_cutoff, low=0, low_open=True)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}.")
        if self.diffusion_loss not in DIFFUSION_LOSSES:
            raise ValueError(f"`diffusion_loss` must be one of {DIFFUSION_LOSSES}, got {self.diffusion_loss!r}.")
        for name in ("train_log_det", "eval_log_det"):
            if getattr(self, name) not in LOG_DET_METHODS:
                raise ValueError(f"`{name}` must be one of {LOG_DET_METHODS}, got {getattr(self, name)!r}.")
        if self.precondition not in PRECONDITIONERS:
            raise ValueError(f"`precondition` must be one of {PRECONDITIONERS}, got {self.precondition!r}.")
        if self.diffusion_weight == 0 and self.flow_kl_weight == 0:
            raise ValueError("Nothing to train: `diffusion_weight` and `flow_kl_weight` are both 0.")
        _positive_int("consistency_points", self.consistency_points, minimum=2)
        _number("consistency_sigma_data", self.consistency_sigma_data, low=0, low_open=True)
        if self.sd_teacher not in ("ema", "current"):
            raise ValueError(f"`sd_teacher` must be 'ema' or 'current', got {self.sd_teacher!r}.")
        self._check_method()
        if self.sd_weight > 0 and self.grid_size % 2:
            raise ValueError(
                f"Self-distillation (`sd_weight` > 0) needs an even `grid_size`, got {self.grid_size}; "
                "use a power of two such as 32 or 128, or set `sd_weight=0`."
            )

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        rules = {
            "dis": {"sd_weight": 0.0, "flow_kl_weight": 0.0},
            "scds": {"volume_weight": 0.0, "jacobian_weight": 0.0, "flow_kl_weight": 0.0, "sd_teacher": "current"},
            "cdds": {"sd_weight": 0.0, "flow_kl_weight": 0.0},
        }.get(self.method, {})
        wrong = {k: getattr(self, k) for k, v in rules.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(
                f"method={self.method!r} does not use "
                + ", ".join(f"`{k}`={v!r}" for k, v in wrong.items())
                + f" (it needs {', '.join(f'{k}={rules[k]!r}' for k in wrong)}); use method='osds' to combine "
                "objectives freely."
            )
        if self.method in ("dis", "scds", "cdds") and self.diffusion_weight <= 0:
            raise ValueError(f"method={self.method!r} is trained by the diffusion-sampler loss: `diffusion_weight` "
                             "must be positive.")
        if self.method == "scds" and self.sd_weight <= 0:
            raise ValueError("method='scds' is defined by its self-consistency loss: `sd_weight` must be positive.")

    @classmethod
    def for_method(cls, method: str, base: OSDSConfig | None = None, **changes) -> OSDSConfig:
        """``base`` (default: the defaults) switched to ``method`` with its defaults
        (:data:`METHOD_DEFAULTS`), then ``changes``."""
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        check_option_names(changes)
        base = cls() if base is None else base
        values = {**base.as_dict(), **METHOD_DEFAULTS[method], "method": method, **changes}
        return cls(**values)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> OSDSConfig:
        """A validated copy with ``changes``; unknown names raise ``TypeError`` with suggestions."""
        check_option_names(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **changes) -> OSDSConfig:
        """A named preset (see :data:`PRESETS`), optionally modified by ``changes``."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls().replace(**PRESETS[name]).replace(**changes)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.field_names()}


def check_option_names(options: dict) -> None:
    """Raises ``TypeError`` naming unknown options, with the closest valid names."""
    valid = OSDSConfig.field_names()
    for name in options:
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TypeError(f"Unknown OSDS option {name!r}.{hint} Valid options: {', '.join(valid)}.")


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
#:               distilled from its probability-flow ODE (:mod:`pyro_osds.consistency`)
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
                  hidden_dim=32, mode_search_starts=2, flow_kl_batch_size=64, consistency_iterations=30,
                  consistency_points=9),
}
