# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Consistency-distilled diffusion sampler (CDDS): a consistency function distilled from the
probability-flow ODE of a trained many-step diffusion sampler (DIS).

The teacher is a DIS control :math:`u_\phi` (trained on fine-grid EM paths, :func:`pyro_osds.losses.diffusion_loss`);
its PF-ODE carries :math:`x_T \sim p_0` (code :math:`c = T`) to :math:`x_0` (code 0). The student is a
consistency function with the EDM skip parameterisation in the remaining time :math:`r = c/T`,

.. math::

    f_\theta(x, c) = c_{\rm skip}(r)\,x + c_{\rm out}(r)\,F_\theta(x, c), \qquad
    c_{\rm skip}(r) = \frac{\sigma_d^2}{r^2 + \sigma_d^2}, \quad
    c_{\rm out}(r) = \frac{\sigma_d\, r}{\sqrt{\sigma_d^2 + r^2}},

so :math:`f_\theta(x, 0) = x`. :math:`F_\theta` is the step-conditioned network of
:mod:`pyro_osds.nets` (step size = the remaining time, Langevin input at :math:`c`), initialised from
the teacher. Training matches :math:`f_\theta` at consecutive points :math:`c_{n+1} > c_n` of a grid of
``consistency_points`` codes along teacher ODE trajectories simulated on the fly:

.. math:: \mathcal L_{\rm CD} = \mathbb E\,\big\|f_\theta(x_{c_{n+1}}, c_{n+1}) - f_{\theta^-}(x_{c_n}, c_n)\big\|^2 / D,

with :math:`\theta^-` the EMA of :math:`\theta`; with ``ema_decay=0`` (the method's default, as in the
CDDS paper) :math:`\theta^- = \operatorname{stopgrad}(\theta)`. A slow EMA target (decay 0.995) made
training at CPU budgets stall: the consistency has to propagate from :math:`f(x, 0) = x` up the grid
one interval at a time.

Sampling: one step :math:`x = f_\theta(x_T, T)` is a deterministic map, so its draws get **exact**
importance weights through :math:`\log|\det \partial f_\theta/\partial x_T|` (the CDDS paper's one-step
"ELBO" drops the volume term and is not a bound). Multi-step consistency sampling alternates
:math:`f_\theta` with re-noising by the reference process's marginal
:math:`x_c = s(c)\,x + \sigma_0\sqrt{1 - s(c)^2}\,\varepsilon`, :math:`s(c) = e^{-\frac12\int_0^{c/T}\beta}`; its
draws have no tractable density, hence no weights.

**References**

[1] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dube, P. Pynadath, R. Zhang (2025), arXiv 2502.07579.
[2] `Consistency Models`, Y. Song, P. Dhariwal, M. Chen, I. Sutskever (2023), arXiv 2303.01469.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, NamedTuple

import torch

from .divergence import batched_jacobian, slogdet
from .estimators import Estimates
from .integrate import _col, flow, langevin_input, potential_and_score, target_weight
from .reference import ReferenceProcess
from .sampler import Draws, FlowSampler, check_num_samples
from .train import Trainer

__all__ = ["ConsistencySampler", "ConsistencyTrainer", "consistency_function", "consistency_grid", "consistency_loss",
           "noise_to", "skip_scalings"]

PotentialFn = Callable[[torch.Tensor], torch.Tensor]


def skip_scalings(remaining: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(c_{\rm skip}(r), c_{\rm out}(r))` of the EDM skip parameterisation (module docstring)."""
    c_skip = sigma_data**2 / (remaining**2 + sigma_data**2)
    c_out = sigma_data * remaining / torch.sqrt(sigma_data**2 + remaining**2)
    return c_skip, c_out


def consistency_grid(grid_size: int, num_points: int) -> list[int]:
    """``min(num_points, grid_size + 1)`` integer codes from 0 to ``grid_size`` (both included), as evenly
    spaced as possible."""
    if num_points < 2:
        raise ValueError(f"`consistency_points` must be at least 2, got {num_points}.")
    num_points = min(num_points, grid_size + 1)
    return sorted({round(i * grid_size / (num_points - 1)) for i in range(num_points)})


class _Output(NamedTuple):
    f: torch.Tensor
    log_det: torch.Tensor | None
    sign: torch.Tensor | None


def consistency_function(
    net: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x: torch.Tensor,
    code,
    *,
    sigma_data: float = 0.5,
    log_det: bool = False,
) -> _Output:
    r"""
    :math:`f_\theta(x, c)` for codes ``code`` (a number or ``(batch,)``), optionally with the exact
    :math:`\log|\det \partial f_\theta/\partial x|` (through the Langevin input), from the network's
    closed-form Jacobian.
    """
    T = process.grid_size
    batch, dim = x.shape
    code = torch.as_tensor(code, dtype=x.dtype, device=x.device).expand(batch)
    remaining = code / T
    c_skip, c_out = skip_scalings(remaining, sigma_data)
    with torch.enable_grad():
        x_in = x if x.requires_grad else x.detach().requires_grad_(log_det)
        weight = torch.as_tensor(target_weight(process, code, code), dtype=x.dtype, device=x.device)
        hessian = None
        if bool((weight != 0).any()):
            _, score = potential_and_score(potential_fn, x_in, create_graph=log_det)
            if log_det:
                hessian = batched_jacobian(score, x_in)
        else:
            score = torch.zeros_like(x_in)
        g = langevin_input(process, x_in, code, score, code)
        if not log_det:
            u = net(x_in, remaining, remaining, g)
            return _Output(_col(c_skip) * x_in + _col(c_out) * u, None, None)
        sigma = process.sigma(code)
        tau = 1.0 - weight
        prior_diag = -(sigma * tau / process.prior_scale**2).unsqueeze(-1).expand(batch, dim)
        g_jac = prior_diag if hessian is None else (
            (sigma * weight)[:, None, None] * hessian + torch.diag_embed(prior_diag))
        u, u_jac_t = net.control_and_jacobian(x_in, remaining, remaining, g, g_jac, transposed=True)
        f = _col(c_skip) * x_in + _col(c_out) * u
        jac_t = c_out[:, None, None] * u_jac_t  # transposed Jacobian: same determinant
        jac_t.diagonal(dim1=-2, dim2=-1).add_(c_skip[:, None])
        sign, logabsdet = slogdet(jac_t)
    return _Output(f.detach(), logabsdet.detach(), sign.detach())


def consistency_loss(
    student: torch.nn.Module,
    target: torch.nn.Module,
    teacher: torch.nn.Module,
    potential_fn: PotentialFn,
    process: ReferenceProcess,
    x0: torch.Tensor,
    codes: list[int],
    *,
    sigma_data: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, int]:
    """The consistency-distillation loss (module docstring) on teacher ODE trajectories from ``x0``.
    Returns ``(loss, num_invalid)``."""
    T = process.grid_size
    with torch.no_grad():
        path = flow(teacher, potential_fn, process, x0, T, log_det="none", return_trajectory=True).trajectory
    states = torch.stack(path)  # index i at code T - i
    batch = x0.shape[0]
    pair = torch.randint(len(codes) - 1, (batch,), device=x0.device, generator=generator)
    grid = torch.tensor(codes, device=x0.device)
    lo, hi = grid[pair], grid[pair + 1]
    rows = torch.arange(batch, device=x0.device)
    x_hi, x_lo = states[T - hi, rows], states[T - lo, rows]
    with torch.no_grad():
        target_f = consistency_function(target, potential_fn, process, x_lo, lo.to(x0.dtype), sigma_data=sigma_data).f
    with torch.enable_grad():
        pred = consistency_function(student, potential_fn, process, x_hi, hi.to(x0.dtype), sigma_data=sigma_data).f
        per_pair = ((pred - target_f) ** 2).mean(-1)
        valid = torch.isfinite(per_pair)
        if int(valid.sum()) < 2:
            return None, int((~valid).sum())
        return per_pair[valid].mean(), int((~valid).sum())


def noise_to(process: ReferenceProcess, x: torch.Tensor, code: float, *, generator=None) -> torch.Tensor:
    r"""Re-noises target-side states ``x`` (code 0) to code ``code`` with the reference marginal
    :math:`x_c = s\,x + \sigma_0\sqrt{1 - s^2}\,\varepsilon`, :math:`s = e^{-\frac12\int_0^{c/T}\beta}`."""
    tau = torch.linspace(0.0, code / process.grid_size, 2001, dtype=torch.float64)
    integral = float(torch.trapezoid(process.beta(tau * process.grid_size), tau))
    s = math.exp(-0.5 * integral)
    eps = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return s * x + process.prior_scale * math.sqrt(max(1.0 - s * s, 0.0)) * eps


class ConsistencyTrainer(Trainer):
    r"""
    Trains the consistency function (student, initialised from ``teacher``) with
    :func:`consistency_loss`; the EMA network is the target :math:`\theta^-`. Randomness, clipping,
    skipping of non-finite steps, history and state dicts as in :class:`~pyro_osds.train.Trainer`.
    """

    def __init__(self, teacher: torch.nn.Module, potential_fn, process, dim, config, **kwargs):
        self.teacher = teacher.requires_grad_(False)
        student = copy.deepcopy(teacher).requires_grad_(True)
        super().__init__(student, potential_fn, process, dim, config, **kwargs)
        self.codes = consistency_grid(process.grid_size, config.consistency_points)

    def iteration(self) -> dict:
        cfg = self.config
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        x0 = self.process.sample_prior(cfg.batch_size, self.dim, clip=True, dtype=self.dtype, device=self.device,
                                       generator=self.generator)
        loss, num_invalid = consistency_loss(self.net, self.ema, self.teacher, self.potential_fn, self.process, x0,
                                             self.codes, sigma_data=cfg.consistency_sigma_data,
                                             generator=self.generator)
        taken, grad_norm = self._optimizer_step(loss)
        value = float(loss.detach()) if loss is not None else math.nan
        info = {k: math.nan for k in ("elbo", "sd_loss", "state_loss", "volume_loss", "jacobian_loss", "flow_kl")}
        info.update(loss=value, grad_norm=grad_norm, skipped=int(not taken), invalid_paths=num_invalid,
                    seconds=time.perf_counter() - start)
        return info

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["teacher"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        super().load_state_dict(state)



class ConsistencySampler(FlowSampler):
    r"""
    CDDS on a batched potential: :meth:`fit` trains the DIS teacher (``num_iterations`` of the
    diffusion loss), then the consistency function (``consistency_iterations``); :meth:`draw` gives
    one-step draws with exact weights, or multi-step consistency draws without weights.
    Same constructor as :class:`~pyro_osds.sampler.FlowSampler`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.consistency_trainer: ConsistencyTrainer | None = None

    def make_consistency_trainer(self) -> ConsistencyTrainer:
        if self.consistency_trainer is None:
            teacher = self.make_trainer().sampling_net
            config = self.config.replace(num_iterations=self.config.consistency_iterations)
            self.consistency_trainer = ConsistencyTrainer(
                teacher, self.whitened_potential, self.process, self.dim, config, generator=self.generator,
                hook_fn=self._hook_fn, disable_progbar=self._disable_progbar, desc=f"{self._desc} (consistency)",
            )
        return self.consistency_trainer

    def fit(self, num_iterations: int | None = None) -> dict[str, list]:
        """Trains the teacher (if unfinished), then the consistency function; returns the latter's history."""
        teacher = self.make_trainer()
        teacher.train(num_iterations)
        if teacher.interrupted:
            return teacher.history
        return self.make_consistency_trainer().train()

    @property
    def interrupted(self) -> bool:
        ct = self.consistency_trainer
        return super().interrupted or (ct is not None and ct.interrupted)

    @property
    def sampling_net(self) -> torch.nn.Module:
        ct = self.consistency_trainer
        if ct is None:
            raise RuntimeError("The consistency function is not trained yet; call `fit()`.")
        return ct.sampling_net

    def draw(self, num_samples: int, num_steps: int = 1, *, log_det: str | None = None,
             chunk_size: int | None = None, generator: torch.Generator | None = None) -> Draws:
        """One-step draws with exact weights, or ``num_steps`` > 1 consistency draws without weights."""
        check_num_samples(num_samples)
        self.process.step_codes(num_steps)
        affine = self.fit_preconditioner()
        potential_z = self.whitened_potential
        net = self.sampling_net
        gen = self.draw_generator if generator is None else generator
        chunk = chunk_size or self.config.chunk_size
        sigma_data = self.config.consistency_sigma_data
        T = self.process.grid_size
        xs, us, lqs, signs = [], [], [], []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            z0 = self.process.sample_prior(n, self.dim, dtype=self.dtype, device=self.device, generator=gen)
            if num_steps == 1:
                out = consistency_function(net, potential_z, self.process, z0, float(T), sigma_data=sigma_data,
                                           log_det=True)
                z, log_q = out.f, self.process.prior_log_prob(z0) - out.log_det - affine.log_abs_det
                signs.append(out.sign)
            else:
                z = z0
                codes = [T * (num_steps - k) / num_steps for k in range(num_steps)]
                for k, code in enumerate(codes):
                    if k > 0:
                        z = noise_to(self.process, z, code, generator=gen)
                    z = consistency_function(net, potential_z, self.process, z, code, sigma_data=sigma_data).f
                log_q = torch.full((n,), math.nan, dtype=self.dtype, device=self.device)
            x = affine(z.detach()).to(self.model_dtype)
            with torch.no_grad():
                u = self.potential_fn(x)
            xs.append(x)
            us.append(u.detach())
            lqs.append(log_q.detach())
        x, u, log_q = torch.cat(xs), torch.cat(us), torch.cat(lqs)
        log_w = (-u.to(torch.float64)) - log_q.to(torch.float64)
        orientation = torch.cat(signs) if signs else None
        return Draws(x, u, log_q, log_w, orientation, "exact" if num_steps == 1 else "none")

    def evidence(self, num_samples: int = 2000, num_steps: int = 1, *, log_det: str | None = None) -> Estimates:
        if num_steps != 1:
            raise ValueError(
                "CDDS draws with num_steps > 1 re-noise between steps, so they have no tractable density and "
                "no importance weights; estimate the evidence with num_steps=1 (exact one-step weights)."
            )
        return super().evidence(num_samples, 1)

    def em_log_weights(self, num_samples: int, num_steps: int = 1, *, chunk_size: int | None = None):
        raise ValueError("CDDS has no EM paths: its one-step map is deterministic (use `evidence`), and the "
                         "DIS teacher's paths describe the teacher, not the consistency function.")

    def forward_evidence(self, target_samples, num_steps: int = 1):
        raise ValueError("Forward estimates need the inverse of the map; CDDS's consistency function is not "
                         "inverted here. Use `evidence` (reverse weights).")

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["consistency"] = (self.consistency_trainer.state_dict() if self.consistency_trainer is not None
                                else None)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.consistency_trainer = None
        if state.get("consistency") is not None:
            self.make_consistency_trainer().load_state_dict(state["consistency"])
