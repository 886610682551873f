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
from .losses import DIFFUSION_LOSSES
from .nets import ACTIVATIONS
from .reference import SCHEDULES

__all__ = ["OSDSConfig", "PRESETS", "PRECONDITIONERS"]

PRECONDITIONERS = ("gaussian", "laplace", "diagonal_laplace", "none")


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
    All hyper-parameters of :class:`~pyro_osds.OSDS` (defaults: a CPU budget; the paper's values
    in parentheses where they differ).

    **Reference process** -- ``grid_size`` :math:`T` (32; the paper's 128), ``schedule`` (``"cosine"``),
    ``sigma_min`` (0.01), ``sigma_max`` (10), ``cosine_s`` (0.008), ``prior_scale`` :math:`\sigma_0`
    (1; applies in the preconditioned space), ``prior_clip`` (4: training draws only),
    ``langevin_time`` (``"start"``, the paper's; ``"end"`` gives one-step maps the target's score,
    see :class:`~pyro_osds.reference.ReferenceProcess`).

    **Network** -- ``hidden_dim`` (64), ``num_layers`` (2), ``num_frequencies`` (64),
    ``max_frequency`` (100), ``inner_clip`` (100), ``outer_clip`` (1e4), ``activation``
    (``"silu"``; the paper's GELU is 3x slower on CPU and available as ``"gelu"``).

    **Training** -- ``num_iterations`` (60 000), ``batch_size`` (1024), ``learning_rate`` (5e-4) with
    ``lr_schedule`` ``"constant"`` (paper) or ``"cosine"`` (decays to a tenth over ``num_iterations``),
    ``weight_decay`` (0.1), ``grad_clip`` (1.0, global norm), ``ema_decay`` (0.999),
    ``diffusion_loss`` (``"kl"`` or ``"lv"``) with weight ``diffusion_weight`` (1; 0 turns the EM-path
    loss and the self-distillation that uses its paths off), ``sd_weight`` (0.25) with a linear ``sd_warmup``
    (2500 iterations), ``volume_weight`` (0.25), ``jacobian_weight`` (1e-4), ``train_log_det``
    (``"hutchinson"``, the volume estimator inside the distillation loss), ``num_probes`` (1),
    ``flow_kl_weight`` (0: off; beyond the paper) weight of a third optimiser step per iteration on
    the exact reverse KL of the ``flow_kl_steps``-step deterministic flows (cycled), on
    ``flow_kl_batch_size`` fresh prior draws,
    ``max_consecutive_skips`` (training stops with an error after this many non-finite steps in a
    row), ``sample_with_ema`` (draw with the EMA network).

    **Preconditioning** -- ``precondition``: ``"gaussian"`` (Gaussian variational fit started from
    the better of the Laplace fit and the identity; default), ``"laplace"``, ``"diagonal_laplace"``
    or ``"none"``; ``precondition_iterations`` for the Gaussian fit; ``mode_search_starts``
    (4): extra random starts of a mode search that, when it finds several separated modes, replaces
    the (mode-seeking) Gaussian fit by a broad Gaussian covering all of them, with a warning.

    **Evaluation** -- ``eval_log_det``: ``"exact"`` (default; exact log-det of the discrete map
    through the Langevin term), or an approximate method for comparison;
    ``exact_log_det_max_dim``: above this dimension the default switches to Hutchinson and the
    estimate says so; ``chunk_size``: draws per batch when sampling/evaluating.
    """

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
    # training
    num_iterations: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    diffusion_loss: str = "kl"
    diffusion_weight: float = 1.0
    sd_weight: float = 0.25
    sd_warmup: int = 100
    volume_weight: float = 0.25
    jacobian_weight: float = 1e-4
    train_log_det: str = "hutchinson"
    num_probes: int = 1
    flow_kl_weight: float = 0.0
    flow_kl_steps: tuple = (1,)
    flow_kl_batch_size: int = 64
    max_consecutive_skips: int = 50
    sample_with_ema: bool = True
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
        for name in ("num_iterations", "sd_warmup", "precondition_iterations", "mode_search_starts"):
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
                     "diffusion_weight"):
            _number(name, getattr(self, name), low=0)
        _number("ema_decay", self.ema_decay, low=0, high=1)
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if self.langevin_time not in ("start", "end"):
            raise ValueError(f"`langevin_time` must be 'start' or 'end', got {self.langevin_time!r}.")
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
        if self.sd_weight > 0 and self.grid_size % 2:
            raise ValueError(
                f"Self-distillation (`sd_weight` > 0) needs an even `grid_size`, got {self.grid_size}; "
                "use a power of two such as 32 or 128, or set `sd_weight=0`."
            )

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


#: Named presets. ``"cpu"`` equals the defaults; ``"paper"`` follows the OSDS code (for a GPU);
#: ``"smoke"`` is a seconds-long run for tests and tutorials' smoke mode.
PRESETS: dict[str, dict] = {
    "cpu": {},
    "paper": dict(
        grid_size=128, num_iterations=60_000, batch_size=1024, learning_rate=5e-4, weight_decay=0.1,
        ema_decay=0.999, sd_warmup=2500, chunk_size=8192, activation="gelu",
    ),
    "smoke": dict(grid_size=16, num_iterations=30, batch_size=32, sd_warmup=10, precondition_iterations=50,
                  hidden_dim=32, mode_search_starts=2),
}
