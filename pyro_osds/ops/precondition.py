# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Affine preconditioning of a target from a Gaussian fit, so that the flow only has to learn the
non-Gaussian part (the maps and the whitened potential: :mod:`~pyro_osds.ops.affine`).

Fits (all return an :class:`~pyro_osds.ops.affine.AffineMap`):

* :func:`fit_laplace`: MAP by L-BFGS, then :math:`L = \operatorname{chol}(H^{-1})` of the Hessian
  (``full``) or :math:`L = \operatorname{diag}(H_{ii}^{-1/2})` (``diagonal``);
* :func:`~pyro_osds.ops.affine.covering_gaussian` of the separated modes a mode search found
  (:func:`~pyro_osds.ops.mode_search.search_modes`): a single mode-seeking Gaussian would hide all but one of
  them, so the preconditioner of one flow is the Gaussian that matches the first two moments of the mixture of
  their Laplace approximations;
* :func:`fit_gaussian`: Gaussian variational fit (maximises the ELBO of
  :math:`\mathcal N(m, LL^\top)` with reparameterised gradients), started from the best of the given
  candidates by a pilot ELBO. Unlike the Laplace fit it cannot collapse onto a spike (e.g. the
  funnel's mode at :math:`x_0 \to -40`).
* :func:`fit_gaussian_natural`: the same variational fit by natural-gradient (Newton-like) steps with the
  expected Hessian, for potentials without a mode to start from (a centred hierarchical model, whose
  density grows without bound as its scale goes to zero), where Adam from the identity is far too slow;
  :func:`fit_gaussian_starts` runs it from every candidate and keeps the best (a Laplace fit in a hierarchical
  model's spike is the wrong start);
* :func:`fit_tails`: every whitened coordinate's left and right tail on top of a Gaussian fit
  (:class:`~pyro_osds.ops.tails.TailAffineMap`), for skewed and heavy-tailed posteriors.

:func:`choose_preconditioner` combines them as :class:`PreconditionConfig` asks and says what it found in a
:class:`SearchReport`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..util import PotentialFn, check_choice, check_number, check_positive_int, raise_device_errors, warn
from .affine import AffineMap, covering_gaussian, scale_from_hessian
from .jacobian import potential_score_hessian
from .marginal import fit_marginal_mixture
from .mode_search import ModeSearch, search_modes
from .tails import TailAffineMap, tail_from_parameter
from .variational import elbo_on_draws, gaussian_elbo

__all__ = ["PRECONDITIONERS", "PreconditionConfig", "SearchReport", "choose_preconditioner",
           "fit_gaussian", "fit_gaussian_natural", "fit_gaussian_starts", "fit_laplace", "fit_tails", "refine_component"]

PRECONDITIONERS = ("gaussian", "laplace", "diagonal_laplace", "none")


class SearchReport(NamedTuple):
    r"""
    What a chain learnt about its target before training: the mode search's findings and the preconditioner
    fitted from them (:func:`choose_preconditioner`; a frozen record).

    :param tuple modes: the separated modes the chain knows of, ``((centre, Laplace mass), ...)``: the modes the
        search kept when it kept several, with the light ones too when it could not enumerate them and a marginal
        mixture spreads over them; empty for a single mode (nothing to lose).
    :param int num_modes: the separated modes the search kept (0: no search ran).
    :param int num_light: the distinct optima it dropped as lighter than 1e-3 of the heaviest.
    :param bool saturated: whether the search stopped because new starts found no new mode rather than by its
        budget (``True`` when no search ran).
    :param int num_starts: the starts it descended from.
    :param bool marginal_mixture: whether the preconditioner is a
        :class:`~pyro_osds.ops.marginal.MarginalMixtureMap`, which spreads over modes it could not enumerate.
    :param int num_laplace_fits: the converged Laplace fits the Gaussian fit chose its start from.
    :param dict fit: the preconditioner fit's own diagnostics (:func:`fit_gaussian`'s pilot ELBOs,
        :func:`fit_gaussian_starts`' ELBO per start, :func:`fit_tails`' under ``"tails"``, the marginal mixture's EM),
        for reports; ``None`` without a fit.
    """

    modes: tuple = ()
    num_modes: int = 0
    num_light: int = 0
    saturated: bool = True
    num_starts: int = 0
    marginal_mixture: bool = False
    num_laplace_fits: int = 0
    fit: dict | None = None

    @classmethod
    def of_search(cls, search: ModeSearch, **fields) -> SearchReport:
        """The report of ``search`` (its kept modes as :attr:`modes` when there are several), with ``fields``."""
        modes = tuple((a.shift, w) for a, w in search.modes) if len(search.modes) > 1 else ()
        return cls(**{"modes": modes, "num_modes": len(search.modes), "num_light": search.num_light,
                      "saturated": search.saturated, "num_starts": search.num_starts, **fields})

    @property
    def too_many_modes(self) -> bool:
        """Whether the search kept finding separated modes until its budget ran out and the preconditioner does not
        spread over them: one flow then covers a few of them, and the evidence misses the mass of the others,
        which its weights cannot show."""
        return not self.saturated and not self.marginal_mixture


def fit_laplace(
    potential_fn: PotentialFn,
    init: torch.Tensor,
    *,
    diagonal: bool = False,
    max_iterations: int = 500,
    tolerance: float = 1e-7,
) -> tuple[AffineMap, dict]:
    r"""
    Laplace fit: MAP :math:`m = \arg\min U` by L-BFGS (strong Wolfe line search) from ``init``,
    Hessian :math:`H = \nabla^2 U(m)` by automatic differentiation, :math:`L = \operatorname{chol}(H^{-1})`
    (negative or tiny eigenvalues are replaced by their magnitude, floored at :math:`10^{-8}\max|\lambda|`).

    :returns: ``(AffineMap, info)`` with ``info = {"map": m, "potential": U(m), "hessian": H,
        "converged": bool, "iterations": int}``.
    """
    x = init.detach().clone().reshape(1, -1).requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iterations, tolerance_grad=tolerance,
                            tolerance_change=1e-12, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = potential_fn(x).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    state = opt.state[opt._params[0]]
    iterations = int(state.get("n_iter", 0))
    x_map = x.detach()
    potential, score, hessian = potential_score_hessian(potential_fn, x_map)
    hessian = hessian[0]
    # converged: a finite optimum whose gradient is small relative to the potential's scale per coordinate
    scale = max(1.0, abs(float(potential[0])) / x_map.numel())
    converged = bool(torch.isfinite(potential).all()) and float(score.abs().max()) < max(1e3 * tolerance, 1e-3) * scale
    if not bool(torch.isfinite(hessian).all()) or not bool(torch.isfinite(x_map).all()):
        raise ValueError(
            "The Laplace fit failed: the potential's MAP or Hessian is not finite. "
            "Use `precondition='gaussian'` or `precondition=None`."
        )
    scale = scale_from_hessian(hessian, diagonal)
    info = {"map": x_map[0], "potential": float(potential[0]), "hessian": hessian, "converged": converged,
            "iterations": iterations}
    return AffineMap(x_map[0].clone(), scale), info


def fit_gaussian(
    potential_fn: PotentialFn,
    candidates: list[AffineMap],
    *,
    num_iterations: int = 500,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    generator: torch.Generator | None = None,
    read_every_iteration: bool | None = None,
) -> tuple[AffineMap, dict]:
    r"""
    Gaussian variational fit :math:`\max_{m, L}\ \mathbb E_{z\sim\mathcal N(0,I)}[-U(m + Lz)] + \log|\det L|`
    by Adam with reparameterised gradients, started from the candidate with the highest pilot
    ELBO. Draws with a non-finite potential are dropped from each gradient estimate (masked: on a GPU, where
    ``read_every_iteration`` is false by default, an iteration reads the device once, whether its gradient is
    finite; on the CPU it also skips an iteration without a finite draw before its backward pass).

    :returns: ``(AffineMap, info)`` with the candidates' pilot ELBOs and the final one; the start is kept
        when no checkpoint of the fit improves on it.
    """
    if not candidates:
        raise ValueError("`fit_gaussian` needs at least one candidate AffineMap.")
    pilot = [float(gaussian_elbo(potential_fn, c, 256, generator=generator)) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: pilot[i] if math.isfinite(pilot[i]) else -math.inf)
    start = candidates[best]
    dim = start.shift.numel()
    shift = start.shift.detach().clone().requires_grad_(True)
    tril = start.scale_tril.detach().clone()
    log_diag = tril.diagonal().abs().log().clone().requires_grad_(True)
    lower = torch.tril(tril, -1).clone().requires_grad_(True)
    mask = torch.tril(torch.ones(dim, dim, dtype=torch.bool, device=tril.device), -1)
    opt = torch.optim.Adam([shift, log_diag, lower], lr=learning_rate)
    # the starting point is a candidate too: the fit only replaces it when it improves the pilot ELBO
    best_state, best_elbo = (shift.detach().clone(), start.scale_tril.clone()), pilot[best]
    on_cpu = shift.device.type == "cpu" if read_every_iteration is None else read_every_iteration
    for it in range(num_iterations):
        with torch.enable_grad():
            scale = torch.diag(log_diag.exp()) + lower * mask
            eps = torch.randn(batch_size, dim, dtype=shift.dtype, device=shift.device, generator=generator)
            u = potential_fn(shift + eps @ scale.T)
            ok = torch.isfinite(u)
            if on_cpu and not bool(ok.any()):
                continue
            # the mean over the finite draws, nothing selected
            loss = torch.where(ok, u, torch.zeros_like(u)).sum() / ok.sum() - log_diag.sum()
            opt.zero_grad()
            loss.backward()
        # one read: a step needs a finite draw (without one the masked gradient is zero, or NaN) and finite gradients
        finite = [ok.any()] + [torch.isfinite(p.grad).all() for p in (shift, log_diag, lower)]
        grads_ok = bool(torch.stack(finite).all())
        if grads_ok:
            opt.step()
        if it % 50 == 49 or it == num_iterations - 1:
            with torch.no_grad():
                cand = AffineMap(shift.detach().clone(), (torch.diag(log_diag.exp()) + lower * mask).detach().clone())
                value = float(gaussian_elbo(potential_fn, cand, 256, generator=generator))
            if value > best_elbo:
                best_elbo, best_state = value, (cand.shift, cand.scale_tril)
    if not math.isfinite(best_elbo):
        warnings.warn("The Gaussian fit did not reach a finite ELBO; keeping its starting point.", RuntimeWarning,
                      stacklevel=2)
    return AffineMap(*best_state), {"pilot_elbos": pilot, "elbo": best_elbo, "start": best}


def fit_gaussian_natural(
    potential_fn: PotentialFn,
    start: AffineMap,
    *,
    num_iterations: int = 40,
    num_samples: int = 16,
    step_size: float = 0.5,
    decay_after: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[AffineMap, dict]:
    r"""
    Gaussian variational fit :math:`q = \mathcal N(m, P^{-1})` by natural-gradient steps. The ELBO's stationary
    points satisfy :math:`\mathbb E_q[\nabla U] = 0` and :math:`P = \mathbb E_q[\nabla^2 U]` [1]; each step
    estimates both expectations from ``num_samples`` draws of the current :math:`q` (the Hessians by one batched
    double-backward pass, :func:`~pyro_osds.ops.jacobian.potential_score_hessian`) and moves towards them,

    .. math::

        P \leftarrow (1-\beta_t) P + \beta_t\,\overline{\nabla^2 U}, \qquad
        m \leftarrow m - \beta_t P^{-1}\,\overline{\nabla U},

    the natural-gradient (variational online Newton) update [2], with :math:`\beta_t` = ``step_size`` for the
    first ``decay_after`` steps and :math:`\beta_t \propto 1/t` after, so the Monte-Carlo noise averages out.
    An indefinite :math:`P` has its eigenvalues clipped at :math:`10^{-3}` of the largest. Unlike Adam on
    :math:`(m, L)` it needs no learning rate for the scale and converges in tens of steps whatever the start.
    Costs :math:`O(S D)` potential evaluations and :math:`O(S D^2)`
    memory per step (the Hessians are averaged one pass at a time).

    :returns: ``(AffineMap, info)``: the last iterate (the decaying steps average the noise out), or the start
        if the last has the lower ELBO on 256 common draws; ``info["elbo_history"]`` has the ELBO every 5 steps.

    **References**

    [1] `The variational Gaussian approximation revisited`, M. Opper, C. Archambeau (2009), Neural Computation 21(3).

    [2] `Fast and scalable Bayesian deep learning by weight-perturbation in Adam`, M. E. Khan, D. Nielsen,
        V. Tangkaratt, W. Lin, Y. Gal, A. Srivastava (2018), ICML.
    """
    check_positive_int("num_iterations", num_iterations)
    check_positive_int("num_samples", num_samples)
    mean = start.shift.detach().clone()
    dim = mean.numel()
    chol = torch.linalg.cholesky(torch.cholesky_inverse(start.scale_tril.detach()))  # P = C C^T
    precision = chol @ chol.T

    def as_affine(c):  # q's scale: L L^T = P^{-1} with L = C^{-T} turned lower triangular
        return AffineMap(mean.clone(), torch.linalg.cholesky(torch.cholesky_inverse(c)))

    eps_check = torch.randn(256, dim, dtype=mean.dtype, device=mean.device, generator=generator)

    def elbo(affine):  # the same draws for every check, so that checks compare fits, not noise
        with torch.no_grad():
            log_w = -potential_fn(affine(eps_check)) + affine.log_abs_det + 0.5 * (eps_check**2).sum(-1)
        return float(torch.nan_to_num(log_w, nan=-math.inf).mean()) + 0.5 * dim * math.log(2 * math.pi)

    start_elbo = elbo(start)
    history, skipped = [], 0
    for step in range(num_iterations):
        eps = torch.randn(num_samples, dim, dtype=mean.dtype, device=mean.device, generator=generator)
        points = mean + torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T  # m + C^{-T} eps ~ N(m, P^-1)
        grad_sum, hess_sum, count = torch.zeros_like(mean), torch.zeros_like(precision), 0
        per_pass = max(1, 4096 // dim)
        for first in range(0, num_samples, per_pass):
            u, score, hess = potential_score_hessian(potential_fn, points[first:first + per_pass])
            ok = torch.isfinite(u) & torch.isfinite(score).all(-1) & torch.isfinite(hess).flatten(1).all(-1)
            grad_sum -= score[ok].sum(0)
            hess_sum += hess[ok].sum(0)
            count += int(ok.sum())
        if count == 0:
            skipped += 1
            continue
        beta = step_size if step < decay_after else step_size * decay_after / (step + 1)
        new = (1 - beta) * precision + beta * 0.5 * (hess_sum + hess_sum.T) / count
        new_chol, info = torch.linalg.cholesky_ex(new)
        if int(info) != 0:
            values, vectors = torch.linalg.eigh(new)
            new = (vectors * values.clamp(min=1e-3 * float(values.abs().max()))) @ vectors.T
            new_chol = torch.linalg.cholesky(0.5 * (new + new.T))
        precision, chol = new, new_chol
        mean = mean - beta * torch.cholesky_solve((grad_sum / count)[:, None], chol)[:, 0]
        if step % 5 == 4:
            history.append(elbo(as_affine(chol)))
    final = as_affine(chol)
    final_elbo = elbo(final)
    best, best_elbo = (final, final_elbo) if final_elbo >= start_elbo else (start, start_elbo)
    return best, {"method": "natural gradient", "elbo": best_elbo, "elbo_history": history,
                  "skipped_steps": skipped}


def fit_gaussian_starts(
    potential_fn: PotentialFn,
    candidates: list[AffineMap],
    *,
    num_iterations: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[AffineMap, dict]:
    r"""
    :func:`fit_gaussian_natural` from every candidate (the Laplace fits of the modes found and the identity), the
    best by the ELBO on common draws (the candidates themselves included). A Laplace fit is the wrong start when the
    mode is a spike: a hierarchical model's mode sits where a scale collapses (Brownian motion with unknown scales,
    the funnel), and a fit started there stays in the spike (Brownian motion: the fit from the Laplace fit 50 nats
    below log Z, the fit from the identity 3.4), while on a regression both starts reach the same Gaussian.

    :returns: ``(AffineMap, info)`` with every start's fitted ELBO (``"start_elbos"``), the chosen start and its ELBO.
    """
    if not candidates:
        raise ValueError("`fit_gaussian_starts` needs at least one candidate AffineMap.")
    start = candidates[0]
    eps = torch.randn(256, start.shift.numel(), dtype=start.shift.dtype, device=start.shift.device,
                      generator=generator)
    fits, elbos = [], []
    failed = 0
    for candidate in candidates:
        try:
            fitted, _ = fit_gaussian_natural(potential_fn, candidate, num_iterations=num_iterations,
                                             generator=generator)
        except (RuntimeError, ValueError) as err:  # e.g. a Cholesky of a non-finite precision: the start stays
            raise_device_errors(err)
            fitted, failed = candidate, failed + 1
        for affine in (candidate, fitted):
            fits.append(affine)
            elbos.append(float(torch.nan_to_num(elbo_on_draws(potential_fn, affine, eps), nan=-math.inf)))
    best = max(range(len(fits)), key=elbos.__getitem__)
    if not math.isfinite(elbos[best]):
        warnings.warn("The Gaussian fit did not reach a finite ELBO; keeping its first candidate.", RuntimeWarning,
                      stacklevel=2)
        best = 0
    return fits[best], {"method": "natural gradient", "start_elbos": elbos[1::2], "start": best // 2,
                        "elbo": elbos[best], "failed_starts": failed}


def fit_tails(
    potential_fn: PotentialFn,
    gaussian: AffineMap,
    *,
    num_iterations: int = 400,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    generator: torch.Generator | None = None,
) -> tuple[AffineMap | TailAffineMap, dict]:
    r"""
    Every whitened coordinate's two tails (:class:`~pyro_osds.ops.tails.TailAffineMap`) fitted on top of a
    Gaussian fit :math:`\mathcal N(m, LL^\top)`: :math:`x = m + L\,(c + \operatorname{diag}(e^{s})\,g(y))` with
    :math:`c`, :math:`s` and the tails' parameters (all zero at the start: the Gaussian itself) maximising the ELBO
    :math:`\mathbb E_y[-U(x) + \log|\det\partial x/\partial y|]` by Adam with reparameterised gradients; the
    parameters are averaged over the second half of the iterations (Polyak averaging: the noise of single steps
    costs ELBO at every coordinate). Only :math:`4D` parameters: a free lower-triangular :math:`L` adds
    :math:`D^2/2` noisy ones (on 256 independent log-Gamma posteriors the averaged fit with them ends 1.2 nats
    below the fit without, 0.08 nats from log Z).

    :returns: ``(map, info)``: the fitted :class:`~pyro_osds.ops.tails.TailAffineMap`, or the Gaussian when it
        has the higher ELBO on common draws; ``info`` has both ELBOs.
    """
    dim, dtype, device = gaussian.shift.numel(), gaussian.shift.dtype, gaussian.shift.device
    params = torch.zeros(4, dim, dtype=dtype, device=device, requires_grad=True)  # c, s, left, right

    def build(p):
        scale = gaussian.scale_tril * p[1].exp()  # L diag(e^s)
        return TailAffineMap(gaussian.shift + gaussian.scale_tril @ p[0], scale, *tail_from_parameter(p[2:]))

    opt = torch.optim.Adam([params], lr=learning_rate)
    average, averaged = torch.zeros_like(params), 0
    skipped = 0
    for it in range(num_iterations):
        y = torch.randn(batch_size, dim, dtype=dtype, device=device, generator=generator)
        with torch.enable_grad():
            x, log_abs_det = build(params).forward_and_log_abs_det(y)
            loss_terms = potential_fn(x) - log_abs_det
            ok = torch.isfinite(loss_terms)
            if not bool(ok.any()):
                skipped += 1
                continue
            opt.zero_grad()
            loss_terms[ok].mean().backward()
        if bool(torch.isfinite(params.grad).all()):
            opt.step()
        else:
            skipped += 1
        if it >= num_iterations // 2:
            averaged += 1
            average += (params.detach() - average) / averaged
    fitted = build(average if averaged else params.detach())
    eps = torch.randn(256, dim, dtype=dtype, device=device, generator=generator)
    elbos = [float(torch.nan_to_num(elbo_on_draws(potential_fn, m, eps), nan=-math.inf)) for m in (gaussian, fitted)]
    chosen = fitted if elbos[1] > elbos[0] else gaussian
    return chosen, {"gaussian_elbo": elbos[0], "tails_elbo": elbos[1], "skipped_steps": skipped}


@dataclass(frozen=True)
class PreconditionConfig:
    r"""
    How a chain's affine preconditioner is fitted (:func:`choose_preconditioner`).

    :param str kind: ``"gaussian"`` (Gaussian variational fit started from the best of the converged
        Laplace fits and the identity; default), ``"laplace"`` (the heaviest converged Laplace fit),
        ``"diagonal_laplace"`` (its marginal standard deviations) or ``"none"``.
    :param int num_iterations: iterations of the Gaussian fit (400).
    :param int mode_search_starts: starts per round of the mode search (:func:`search_modes`; 64; 0 turns
        the search off).
    :param float mode_search_scale: the spread of the first round's starts around the initial point (2);
        it doubles while rounds find new modes.
    :param str components: ``"auto"`` (default): when the search finds several separated modes (and stops
        because it found them all, at most ``max_components``), a chain is a mixture with one component per
        mode (:class:`~pyro_osds.samplers.MixtureSampler`); ``"single"``: one flow preconditioned by a broad
        Gaussian covering the modes.
    :param int max_components: the most modes that get a component each (64).
    :param int marginal_components: when the search finds more separated modes than it can enumerate (it does
        not saturate), the ``"gaussian"`` preconditioner is a :class:`~pyro_osds.ops.marginal.MarginalMixtureMap`
        with this many components per coordinate, fitted by importance-weighted EM from the modes found
        (:func:`~pyro_osds.ops.marginal.fit_marginal_mixture`; 4). 0: a Gaussian at the heaviest mode found, which
        keeps few of the modes.
    :param str gaussian_fit: how the ``"gaussian"`` preconditioner of a single-mode chain is fitted: ``"adam"``
        (default: Adam from the candidate with the best pilot ELBO, :func:`fit_gaussian`) or ``"natural"``
        (natural-gradient steps from every candidate, the best kept, :func:`fit_gaussian_starts`: much closer to
        hierarchical posteriors, whose Laplace fit is a spike Adam cannot leave, at :math:`O(D)` potential
        gradients per draw for the Hessians; see the design notes for why it is not the default).
    :param int natural_iterations: steps of each natural-gradient fit (100).
    :param bool tails: the ``"gaussian"`` preconditioner gives every whitened coordinate its own left and right
        tail (:func:`fit_tails`, ``num_iterations`` Adam steps after the Gaussian fit): for skewed and heavy-tailed
        posteriors (positive parameters on the log scale, random-effect scales). Not where no Laplace fit converged
        (a centred hierarchical model, fitted from the identity): on the centred eight schools, tails fitted there
        raised the ELBO but left the trained map's weights worse (ESS/N 0.60 and 0.58 without, 0.01 and 0.38 with,
        two seeds).
    """

    kind: str = "gaussian"
    num_iterations: int = 400
    mode_search_starts: int = 64
    mode_search_scale: float = 2.0
    components: str = "auto"
    max_components: int = 64
    marginal_components: int = 4
    gaussian_fit: str = "adam"
    natural_iterations: int = 100
    tails: bool = False

    def __post_init__(self):
        check_choice("precondition", self.kind, PRECONDITIONERS)
        check_positive_int("precondition_iterations", self.num_iterations, minimum=0)
        check_positive_int("mode_search_starts", self.mode_search_starts, minimum=0)
        check_number("mode_search_scale", self.mode_search_scale, low=0, low_open=True)
        check_choice("components", self.components, ("auto", "single"))
        check_positive_int("max_components", self.max_components, minimum=2)
        check_positive_int("marginal_components", self.marginal_components, minimum=0)
        check_choice("gaussian_fit", self.gaussian_fit, ("adam", "natural"))
        check_positive_int("natural_iterations", self.natural_iterations)
        if not isinstance(self.tails, bool):
            raise ValueError(f"`precondition_tails` must be True or False, not {self.tails!r}.")

    def search(self, potential_fn: PotentialFn, init: torch.Tensor, *,
               generator: torch.Generator | None = None, standard: torch.Tensor | None = None) -> ModeSearch:
        """The mode search these settings ask for (:func:`search_modes`; ``standard``: its coordinates known to be
        standard normal and independent of the others)."""
        return search_modes(potential_fn, init, starts_per_round=self.mode_search_starts,
                            initial_scale=self.mode_search_scale, generator=generator, standard=standard)

    def wants_components(self, search: ModeSearch) -> bool:
        """Whether ``search`` calls for one mixture component per mode (class docstring)."""
        return (self.components == "auto" and self.kind != "none" and search.saturated
                and 2 <= len(search.modes) <= self.max_components)


def _diagonal(affine: AffineMap) -> AffineMap:
    """The same fit with only the marginal scales: ``diag(sqrt(diag(L L^T)))``."""
    cov = affine.scale_tril @ affine.scale_tril.T
    return AffineMap(affine.shift, torch.diag(cov.diagonal().sqrt()))


def choose_preconditioner(
    potential_fn: PotentialFn,
    init: torch.Tensor,
    config: PreconditionConfig,
    *,
    search: ModeSearch | None = None,
    generator: torch.Generator | None = None,
    starts: Sequence[AffineMap] = (),
) -> tuple[AffineMap, SearchReport]:
    r"""
    The affine preconditioner of one flow that :class:`PreconditionConfig` asks for, fitted on
    ``potential_fn`` from ``init`` (in their dtype):

    1. the mode search (``search``, else :meth:`PreconditionConfig.search` when ``mode_search_starts > 0``);
       several separated modes, all found (a saturated search), give their :func:`covering_gaussian` at once
       (one flow must cover them);
    2. several modes, too many to enumerate (an unsaturated search), and ``"gaussian"``: the
       :class:`~pyro_osds.ops.marginal.MarginalMixtureMap` fitted from them (``marginal_components`` > 0);
    3. else the Laplace fit of the mode found (the heaviest, when the search could not enumerate them: one
       flow holds few modes, and over a cover of a sample of them it settles on an arbitrary one), or from
       ``init``, diagonalised for
       ``"diagonal_laplace"``, the given ``starts`` (e.g. a mean-field fit) and the identity at ``init`` are the
       candidates: ``"laplace"`` takes the first, ``"gaussian"`` runs :func:`fit_gaussian` from the best of them.

    :returns: ``(AffineMap, SearchReport)``.
    :raises ValueError: ``"laplace"``/``"diagonal_laplace"`` when no Laplace fit converged.
    """
    dim = init.numel()
    identity = AffineMap.identity(dim, shift=init, dtype=init.dtype, device=init.device)
    if config.kind == "none":
        return identity, SearchReport()
    if search is None and config.mode_search_starts > 0:
        search = config.search(potential_fn, init, generator=generator)
    laplace_fits = []
    report = SearchReport() if search is None else SearchReport.of_search(search)
    if search is not None:
        if len(search.modes) > 1 and search.saturated:
            return covering_gaussian(search.modes), report
        found = list(search.modes) + list(search.light)
        if (not search.saturated and len(found) > 1 and config.kind == "gaussian"
                and config.marginal_components > 0):
            # too many to enumerate (e.g. a product of multimodal factors): a bijection that splits every
            # coordinate across its wells, fitted to the weights' marginals from every mode found, light or not
            marginal, fit = fit_marginal_mixture(potential_fn, found, num_components=config.marginal_components,
                                                 generator=generator)
            return marginal, report._replace(modes=tuple((a.shift, w) for a, w in found), marginal_mixture=True,
                                             fit=fit)
        # one mode, or too many to enumerate: one flow holds few of them, so it starts at the heaviest found
        laplace_fits = [affine for affine, _ in search.modes[:1]]
    if not laplace_fits:
        try:
            affine, fit = fit_laplace(potential_fn, init)
            if fit["converged"]:
                laplace_fits.append(affine)
        except (ValueError, RuntimeError) as err:
            raise_device_errors(err)
    if config.kind == "diagonal_laplace":
        laplace_fits = [_diagonal(a) for a in laplace_fits]
    report = report._replace(num_laplace_fits=len(laplace_fits))
    if not laplace_fits:
        if config.kind != "gaussian":
            raise ValueError(
                "No Laplace fit converged (the potential may have no interior maximum, e.g. a spike where a "
                "scale goes to zero). Use `precondition='gaussian'` (a variational fit) or `precondition='none'`."
            )
        # no mode to start from (e.g. a centred hierarchical model, unbounded as its scale goes to zero): Adam
        # from the identity takes thousands of steps in high dimension, natural-gradient steps tens
        warn("No Laplace fit converged (no interior mode, e.g. a density that grows as a scale goes to zero); "
             "fitting the Gaussian preconditioner from the identity by natural-gradient steps.", RuntimeWarning)
        affine, fit = fit_gaussian_natural(potential_fn, identity, generator=generator)
        return affine, report._replace(fit=fit)
    candidates = laplace_fits + [s.to(dtype=init.dtype, device=init.device) for s in starts] + [identity]
    if config.kind in ("laplace", "diagonal_laplace"):
        return candidates[0], report  # the heaviest converged mode
    if config.gaussian_fit == "natural":
        affine, fit = fit_gaussian_starts(potential_fn, candidates, num_iterations=config.natural_iterations,
                                          generator=generator)
    else:
        affine, fit = fit_gaussian(potential_fn, candidates, num_iterations=config.num_iterations,
                                   generator=generator)
    affine, fit = _with_tails(potential_fn, affine, fit, config, generator)
    return affine, report._replace(fit=fit)


def refine_component(potential_fn: PotentialFn, laplace: AffineMap, config: PreconditionConfig, *,
                     generator: torch.Generator | None = None) -> tuple[AffineMap, dict | None]:
    """The preconditioner of a mixture component at one mode, from that mode's Laplace fit: the fit
    itself (``"laplace"``), its marginal scales (``"diagonal_laplace"``) or a Gaussian variational fit
    started there (``"gaussian"``; it stays at the mode it starts at, and is kept only if it improves), with its
    tails (:func:`fit_tails`) when ``config.tails``. Returns ``(AffineMap or TailAffineMap, fit)``, ``fit`` the
    Gaussian fit's diagnostics (``None`` without one)."""
    if config.kind == "laplace":
        return laplace, None
    if config.kind == "diagonal_laplace":
        return _diagonal(laplace), None
    affine, fit = fit_gaussian(potential_fn, [laplace], num_iterations=config.num_iterations, generator=generator)
    return _with_tails(potential_fn, affine, fit, config, generator)


def _with_tails(potential_fn: PotentialFn, affine: AffineMap, fit: dict, config: PreconditionConfig,
                generator: torch.Generator | None) -> tuple[AffineMap | TailAffineMap, dict]:
    """The fitted Gaussian ``affine`` and its fit's diagnostics ``fit``, with the tails fitted on top
    (:func:`fit_tails`, their diagnostics under ``"tails"``) when ``config.tails``."""
    if not config.tails:
        return affine, fit
    affine, tails_fit = fit_tails(potential_fn, affine, num_iterations=config.num_iterations, generator=generator)
    return affine, {**fit, "tails": tails_fit}
