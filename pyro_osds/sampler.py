# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
:class:`FlowSampler`: one trainable one-step diffusion sampler for a batched potential on
:math:`\mathbb R^D`, with draws, importance weights and evidence estimates. No Pyro involved.

Draws are made in the preconditioned space :math:`z` (prior :math:`\mathcal N(0, \sigma_0^2 I)`,
flow of :math:`K` PF-ODE steps) and mapped to :math:`x = m + Lz`. Each draw carries

.. math::

    \log q(x) = \log p_0(z_0) - \sum_k \log|\det \partial F_k/\partial z_k| - \log|\det L|, \qquad
    \log w = -U(x) - \log q(x),

so :math:`\log\hat Z = \log\frac1N\sum w` and the ELBO :math:`\frac1N\sum\log w` refer to the
original potential :math:`U`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple

import torch

from .config import OSDSConfig
from .estimators import Estimates, ForwardEstimates, evidence, forward_evidence
from .integrate import count_folded, em_rollout, flow, inverse_flow
from .nets import StepConditionedControl
from .precondition import (
    AffineMap,
    covering_gaussian,
    find_modes,
    fit_gaussian,
    fit_laplace,
    lost_modes,
    mode_shares,
    whiten_potential,
)
from .reference import ReferenceProcess
from .train import Trainer

__all__ = ["Draws", "FlowSampler", "make_process", "make_network"]


def _diagonal(affine: AffineMap) -> AffineMap:
    """The same fit with only the marginal scales: ``diag(sqrt(diag(L L^T)))``."""
    cov = affine.scale_tril @ affine.scale_tril.T
    return AffineMap(affine.shift, torch.diag(cov.diagonal().sqrt()))

PotentialFn = Callable[[torch.Tensor], torch.Tensor]


def check_num_samples(num_samples) -> None:
    """Raises ``ValueError`` unless ``num_samples`` is a positive integer."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")


class Draws(NamedTuple):
    r"""
    Weighted draws: ``x`` ``(N, D)`` in the potential's space, ``potential`` :math:`U(x)`,
    ``log_q`` (sampler log density at ``x``), ``log_weight`` :math:`= -U - \log q`, ``folded``
    (sign of the map's Jacobian determinant at each draw, exact log-det methods only), and
    ``log_det`` (method).
    """

    x: torch.Tensor
    potential: torch.Tensor
    log_q: torch.Tensor
    log_weight: torch.Tensor
    orientation: torch.Tensor | None
    log_det: str

    @property
    def folded(self) -> torch.Tensor | None:
        """Draws whose Jacobian orientation differs from the majority's (the map folds there)."""
        return count_folded(self.orientation)

    @property
    def num_folded(self) -> int:
        folded = self.folded
        return 0 if folded is None else int(folded.sum())


def make_process(config: OSDSConfig) -> ReferenceProcess:
    return ReferenceProcess(
        grid_size=config.grid_size, schedule=config.schedule, sigma_min=config.sigma_min, sigma_max=config.sigma_max,
        cosine_s=config.cosine_s, prior_scale=config.prior_scale, prior_clip=config.prior_clip,
        langevin_time=config.langevin_time,
    )


def make_network(dim: int, config: OSDSConfig, *, dtype=None, device=None,
                 generator: torch.Generator | None = None) -> StepConditionedControl:
    """The control network of ``config``; its initial weights come from ``generator`` (when given)
    without touching the global RNG, so a chain's network depends on its own seed only."""
    def build():
        return StepConditionedControl(
            dim, hidden_dim=config.hidden_dim, num_layers=config.num_layers, num_frequencies=config.num_frequencies,
            max_frequency=config.max_frequency, inner_clip=config.inner_clip, outer_clip=config.outer_clip,
            activation=config.activation, dtype=dtype, device=device,
        )

    if generator is None:
        return build()
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[] if torch.device(device or "cpu").type == "cpu" else [device]):
        torch.manual_seed(seed)
        return build()


class FlowSampler:
    r"""
    A one-step diffusion sampler for a batched potential (module docstring).

    :param callable potential_fn: ``(batch, dim) -> (batch,)`` potential :math:`U = -\log\rho`,
        differentiable by autograd (twice, for exact weights).
    :param torch.Tensor init: a point ``(dim,)`` where the potential is finite (sets dtype and
        device, and starts the preconditioner's fit).
    :param OSDSConfig config: hyper-parameters.
    :param AffineMap preconditioner: use this affine map instead of fitting one.
    :param torch.Generator generator: randomness for training (default: seeded from the global RNG);
        draws use a second generator seeded from it, so drawing never changes training.
    """

    def __init__(
        self,
        potential_fn: PotentialFn,
        init: torch.Tensor,
        config: OSDSConfig | None = None,
        *,
        preconditioner: AffineMap | None = None,
        generator: torch.Generator | None = None,
        hook_fn: Callable | None = None,
        disable_progbar: bool = False,
        desc: str = "OSDS",
    ):
        self.config = config = OSDSConfig() if config is None else config
        init = torch.as_tensor(init)
        if init.dim() != 1 or not init.is_floating_point():
            raise ValueError(f"`init` must be a 1-D floating point tensor, got shape {tuple(init.shape)} "
                             f"and dtype {init.dtype}.")
        self.potential_fn = potential_fn
        self.init = init.detach().clone()
        self.dim = init.numel()
        # the network and flow run in `config.dtype` (default: the potential's); the potential is always
        # evaluated in its own dtype, on cast inputs, so any model works with a float32 flow
        self.model_dtype, self.device = init.dtype, init.device
        self.dtype = getattr(torch, config.dtype) if config.dtype is not None else init.dtype
        self.process = make_process(config)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.generator = generator  # training: network init, preconditioner fit, trainer
        # drawing has its own stream, so that sampling never perturbs (resumed) training
        self.draw_generator = torch.Generator(device=self.device)
        self.draw_generator.manual_seed(int(torch.randint(0, 2**62, (), generator=generator, device=generator.device)))
        self.preconditioner = preconditioner
        self.precondition_info: dict = {}
        self.net = make_network(self.dim, config, dtype=self.dtype, device=self.device, generator=self.generator)
        self.trainer: Trainer | None = None
        self._hook_fn, self._disable_progbar, self._desc = hook_fn, disable_progbar, desc

    # ------------------------------------------------------------------------------------------
    def fit_preconditioner(self) -> AffineMap:
        """Fits the affine preconditioner chosen by ``config.precondition`` (once)."""
        if self.preconditioner is not None:
            return self.preconditioner
        self.preconditioner = self._fit_preconditioner_in_model_dtype().to(dtype=self.dtype)
        return self.preconditioner

    def _fit_preconditioner_in_model_dtype(self) -> AffineMap:
        cfg = self.config
        identity = AffineMap.identity(self.dim, shift=self.init, dtype=self.model_dtype, device=self.device)
        if cfg.precondition == "none":
            return identity
        if cfg.mode_search_starts > 0:
            search: dict = {}
            modes = find_modes(self.potential_fn, self.init, num_starts=cfg.mode_search_starts,
                               generator=self.generator, info=search)
            light = self.precondition_info["light_modes"] = search["num_light_modes"]
            if len(modes) == 1 and light:
                warnings.warn(
                    f"The mode search found {light} further local optima of the potential, "
                    "each with less than 1e-3 of the main mode's Laplace mass. OSDS ignores them and is likely to "
                    "miss them, which the importance weights cannot show. Alone each is negligible, but many "
                    "light modes (e.g. a product of independent multimodal factors) can together hold much "
                    "mass: check against another method if the model can be multimodal.",
                    UserWarning, stacklevel=4,
                )
            if len(modes) > 1:
                cover = covering_gaussian(modes)
                self.precondition_info["modes"] = [(a.shift, w) for a, w in modes]
                if cfg.diffusion_weight == 0:
                    advice = ("The one-step objective (reverse KL) is mode-seeking: for multimodal targets "
                              f"{self._multimodal_remedy()}, and check the samples of each mode and the per-chain "
                              "log Z.")
                else:
                    advice = ("Reverse-KL training can still drop modes: check the samples of each mode and the "
                              "per-chain log Z.")
                warnings.warn(
                    f"The target has at least {len(modes)} separated modes (Laplace masses "
                    + ", ".join(f"{w:.2g}" for _, w in modes)
                    + "); a Gaussian preconditioner would hide all but one, so OSDS uses a broad Gaussian covering "
                    "them. " + advice,
                    UserWarning, stacklevel=4,
                )
                return cover
            laplace_fits = [affine for affine, _ in modes]  # converged fits only (heaviest first)
        else:
            laplace_fits = []
            try:
                affine, info = fit_laplace(self.potential_fn, self.init)
                if info["converged"]:
                    laplace_fits.append(affine)
            except (ValueError, RuntimeError):
                pass
        if cfg.precondition == "diagonal_laplace":
            laplace_fits = [_diagonal(a) for a in laplace_fits]
        self.precondition_info["laplace"] = {"converged_fits": len(laplace_fits)}
        if not laplace_fits:
            if cfg.precondition != "gaussian":
                raise ValueError(
                    "No Laplace fit converged (the potential may have no interior maximum, e.g. a spike where a "
                    "scale goes to zero). Use `precondition='gaussian'` (a variational fit) or `precondition='none'`."
                )
            warnings.warn("No Laplace fit converged; fitting the Gaussian preconditioner from the identity.",
                          RuntimeWarning, stacklevel=4)
        candidates = laplace_fits + [identity]
        if cfg.precondition in ("laplace", "diagonal_laplace"):
            return candidates[0]  # the heaviest converged mode
        affine, info = fit_gaussian(self.potential_fn, candidates, num_iterations=cfg.precondition_iterations,
                                    generator=self.generator)
        self.precondition_info["gaussian"] = info
        return affine

    def flow_potential(self, z: torch.Tensor) -> torch.Tensor:
        """The potential on inputs of the flow's dtype (evaluated in the model's dtype)."""
        if self.dtype == self.model_dtype:
            return self.potential_fn(z)
        return self.potential_fn(z.to(self.model_dtype)).to(self.dtype)

    @property
    def whitened_potential(self) -> PotentialFn:
        return whiten_potential(self.flow_potential, self.fit_preconditioner())

    @property
    def flow_kl_gradient(self) -> str:
        """The one-step objective's gradient estimator: ``config.flow_kl_gradient``, where ``"auto"`` is
        ``"total"`` if the mode search found several modes (the path estimator lost modes more often on
        the 9-mode mixture) and ``"path"`` otherwise. Fits the preconditioner if needed."""
        if self.config.flow_kl_gradient != "auto":
            return self.config.flow_kl_gradient
        self.fit_preconditioner()
        return "total" if len(self.precondition_info.get("modes", ())) > 1 else "path"

    def make_trainer(self) -> Trainer:
        if self.trainer is None:
            self.trainer = Trainer(
                self.net, self.whitened_potential, self.process, self.dim, self.config, generator=self.generator,
                hook_fn=self._hook_fn, disable_progbar=self._disable_progbar, desc=self._desc,
                flow_kl_gradient=self.flow_kl_gradient,
            )
        return self.trainer

    def fit(self, num_iterations: int | None = None) -> dict[str, list]:
        """Fits the preconditioner (once) and trains; returns the training history."""
        return self.make_trainer().train(num_iterations)

    @property
    def sampling_net(self) -> torch.nn.Module:
        return self.trainer.sampling_net if self.trainer is not None else self.net

    @property
    def interrupted(self) -> bool:
        """Whether the last :meth:`fit` was stopped by ``KeyboardInterrupt``."""
        return self.trainer is not None and self.trainer.interrupted

    # ------------------------------------------------------------------------------------------
    def default_log_det(self) -> str:
        cfg = self.config
        if cfg.eval_log_det == "exact" and self.dim > cfg.exact_log_det_max_dim:
            return "hutchinson"
        return cfg.eval_log_det

    def draw(
        self,
        num_samples: int,
        num_steps: int = 1,
        *,
        log_det: str | None = None,
        chunk_size: int | None = None,
        num_probes: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Draws:
        """
        ``num_samples`` fresh weighted draws from the ``num_steps``-step deterministic flow.
        ``log_det="none"`` draws without weights (the potential is not evaluated; ``potential``,
        ``log_q`` and ``log_weight`` are NaN); ``num_probes`` sets the probes of the
        ``"hutchinson"`` volume (default ``config.eval_num_probes``).
        """
        check_num_samples(num_samples)
        self.process.step_codes(num_steps)  # validates num_steps
        log_det = self.default_log_det() if log_det is None else log_det
        chunk = chunk_size or self.config.chunk_size
        affine = self.fit_preconditioner()
        potential_z = self.whitened_potential
        net = self.sampling_net
        gen = self.draw_generator if generator is None else generator
        xs, us, lqs, signs = [], [], [], []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            z0 = self.process.sample_prior(n, self.dim, clip=False, dtype=self.dtype, device=self.device, generator=gen)
            out = flow(net, potential_z, self.process, z0, num_steps, log_det=log_det,
                       num_probes=num_probes or self.config.eval_num_probes, generator=gen)
            x = affine(out.x).to(self.model_dtype)
            if log_det == "none":
                u = torch.full((n,), math.nan, dtype=self.model_dtype, device=self.device)
                log_q = torch.full((n,), math.nan, dtype=self.dtype, device=self.device)
            else:
                with torch.no_grad():
                    u = self.potential_fn(x)
                log_q = self.process.prior_log_prob(z0) - out.log_det - affine.log_abs_det
            xs.append(x.detach())
            us.append(u.detach())
            lqs.append(log_q.detach())
            signs.append(out.orientation)
        x, u, log_q = torch.cat(xs), torch.cat(us), torch.cat(lqs)
        log_w = (-u.to(torch.float64)) - log_q.to(torch.float64)
        orientation = None if signs[0] is None else torch.cat(signs)
        return Draws(x, u, log_q, log_w, orientation, log_det)

    @staticmethod
    def _multimodal_remedy() -> str:
        return "add the paper's diffusion objective (`preset='paper-cpu', flow_kl_weight=1.0`)"

    def mode_coverage(self, draws: Draws) -> list[tuple[torch.Tensor, float, float]]:
        """
        For each separated mode the mode search found (none for a unimodal fit): its location, its
        Laplace mass and the importance-weighted share of ``draws`` nearest to it
        (:func:`~pyro_osds.precondition.mode_shares`). A share far below the mass means the sampler
        lost that mode, and the evidence is then low by about :math:`-\\log(1 - \\text{mass})`,
        which the weights themselves cannot show.
        """
        modes = self.precondition_info.get("modes") or []
        if len(modes) < 2:
            return []
        centers = torch.stack([c for c, _ in modes]).to(draws.x.device)
        shares = mode_shares(draws.x, draws.log_weight, centers)
        return [(c, float(m), float(sh)) for (c, m), sh in zip(modes, shares, strict=True)]

    def warn_lost_modes(self, draws: Draws, label: str = "") -> list[int]:
        """Warns (and returns their indices) about modes of :meth:`mode_coverage` the draws have lost."""
        coverage = self.mode_coverage(draws)
        if not coverage:
            return []
        lost = lost_modes([m for _, m, _ in coverage], [sh for _, _, sh in coverage])
        if lost:
            missing = sum(coverage[k][1] for k in lost)
            warnings.warn(
                f"{label}The draws carry almost no weight near {len(lost)} of the {len(coverage)} modes the mode "
                "search found (Laplace mass "
                + ", ".join(f"{coverage[k][1]:.2g} vs weighted share {coverage[k][2]:.2g}" for k in lost)
                + f"): the sampler has lost them, so log Z is probably low by about {-math.log1p(-min(missing, 0.999)):.2g}"
                " nats and the posterior misses those modes. Retrain (another seed, more iterations)"
                + (f" or {self._multimodal_remedy()}." if self.config.diffusion_weight == 0 else "."),
                RuntimeWarning, stacklevel=3,
            )
        return lost

    def evidence(self, num_samples: int = 2000, num_steps: int = 1, *, log_det: str | None = None) -> Estimates:
        """Evidence estimates from fresh deterministic-flow draws (never the training batch)."""
        d = self.draw(num_samples, num_steps, log_det=log_det)
        return evidence(d.log_weight, num_folded=d.num_folded, log_det=d.log_det)

    def em_log_weights(self, num_samples: int, num_steps: int = 1, *, chunk_size: int | None = None) -> torch.Tensor:
        r"""Log-weights of stochastic EM paths with ``num_steps`` steps (what breaks at few steps)."""
        self.process.step_codes(num_steps)
        chunk = chunk_size or self.config.chunk_size
        potential_z = self.whitened_potential
        out = []
        for start in range(0, num_samples, chunk):
            n = min(chunk, num_samples - start)
            z0 = self.process.sample_prior(n, self.dim, dtype=self.dtype, device=self.device,
                                           generator=self.draw_generator)
            path = em_rollout(self.sampling_net, potential_z, self.process, z0, num_steps,
                              generator=self.draw_generator)
            with torch.no_grad():
                u = potential_z(path.states[-1])
            lw = path.log_backward - path.log_forward - u - self.process.prior_log_prob(z0)
            out.append(lw.detach().to(torch.float64))
        return torch.cat(out)

    def em_evidence(self, num_samples: int = 2000, num_steps: int = 1) -> Estimates:
        """Evidence estimates from EM-path weights (for comparison with the deterministic flow)."""
        return evidence(self.em_log_weights(num_samples, num_steps), log_det="em_path", what="EM-path log-weights")

    def log_q(self, x: torch.Tensor, num_steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Sampler log density at given points ``x`` (exact inverse flow); returns ``(log_q, ok)``
        where ``ok`` marks points whose inversion converged with the majority orientation.
        """
        affine = self.fit_preconditioner()
        z = affine.inverse(torch.as_tensor(x, device=self.device).to(self.dtype))
        inv = inverse_flow(self.sampling_net, self.whitened_potential, self.process, z, num_steps)
        log_q = self.process.prior_log_prob(inv.x0) - inv.log_det - affine.log_abs_det
        return log_q.detach(), inv.converged & ~count_folded(inv.orientation)

    def forward_evidence(self, target_samples: torch.Tensor, num_steps: int = 1) -> ForwardEstimates:
        r"""EUBO and forward :math:`\log\hat Z` from exact target draws, via the exact inverse flow."""
        x = torch.as_tensor(target_samples, dtype=self.model_dtype, device=self.device)
        log_q, ok = self.log_q(x, num_steps)
        with torch.no_grad():
            u = self.potential_fn(x)
        lw = (-u.to(torch.float64)) - log_q.to(torch.float64)
        if not bool(ok.all()):
            warnings.warn(f"The inverse flow did not converge (or folded) for {int((~ok).sum())} of {ok.numel()} "
                          "target draws; they are excluded.", RuntimeWarning, stacklevel=2)
            lw = torch.where(ok, lw, torch.full_like(lw, math.nan))
        return forward_evidence(lw)

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        affine = self.fit_preconditioner()
        return {
            "preconditioner": {"shift": affine.shift.detach().clone(), "scale_tril": affine.scale_tril.detach().clone()},
            "trainer": self.make_trainer().state_dict(),
            "generator": self.generator.get_state(),
            "draw_generator": self.draw_generator.get_state(),
            "dim": self.dim,
            # the separated modes the mode search found (for the lost-mode check after loading)
            "modes": [(c.detach().clone(), float(m)) for c, m in self.precondition_info.get("modes", [])],
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"State is for dimension {state['dim']}, this sampler has dimension {self.dim}.")
        pre = state["preconditioner"]
        self.preconditioner = AffineMap(pre["shift"].to(self.dtype), pre["scale_tril"].to(self.dtype))
        self.trainer = None
        self.make_trainer().load_state_dict(state["trainer"])
        self.generator.set_state(state["generator"])
        self.draw_generator.set_state(state["draw_generator"])
        if state.get("modes"):
            self.precondition_info["modes"] = [(c, float(m)) for c, m in state["modes"]]
