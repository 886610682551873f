# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The public runner :class:`OSDS`: a drop-in replacement for ``MCMC(NUTS(model)).run(...)`` that
returns posterior draws *and* the model's log evidence.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from itertools import product
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.ops.stats import split_gelman_rubin, weighed_quantile

from ._version import __version__
from .config import OSDSConfig, check_option_names
from .consistency import ConsistencySampler
from .estimators import Estimates, EvidenceError, evidence, kish_ess, pool_estimates
from .potential import ModelTarget
from .sampler import Draws, FlowSampler
from .target import PotentialTarget

__all__ = ["OSDS", "LogEvidence"]

CHECKPOINT_FORMAT = "pyro_osds.OSDS/1"
#: settings that may differ between a checkpoint and the run that resumes it
RESUMABLE_CHANGES = frozenset({"num_iterations", "chunk_size", "eval_log_det", "exact_log_det_max_dim",
                               "eval_num_probes", "max_consecutive_skips", "sample_with_ema"})


class LogEvidence(NamedTuple):
    r"""
    Log-evidence estimates of an :class:`OSDS` run, pooled over chains (``chains`` holds each
    chain's :class:`~pyro_osds.estimators.Estimates`).

    ``log_z`` :math:`\log\hat Z` and its standard error ``se``; ``elbo``/``elbo_se`` (a lower bound
    of :math:`\log Z`); ``ess`` (Kish) and ``ess_per_draw``; ``k_hat`` (Pareto, the largest over
    chains; > 0.7 means the estimate is unreliable); ``num_draws``; ``num_folded`` (draws where the flow folds; their
    weights are not exact); ``num_nonfinite`` (excluded NaN weights); ``log_det`` (volume method);
    ``num_steps`` (the flow's :math:`K`).
    """

    log_z: float
    se: float
    elbo: float
    elbo_se: float
    ess: float
    ess_per_draw: float
    k_hat: float
    num_draws: int
    num_folded: int
    num_nonfinite: int
    log_det: str
    num_steps: int
    chains: tuple

    def __str__(self) -> str:
        lines = [
            f"log Z = {self.log_z:.4f} +- {self.se:.4f} (ELBO {self.elbo:.4f}, ESS {self.ess:.0f}/{self.num_draws}, "
            f"k_hat {self.k_hat:.2f}; {self.num_steps}-step flow, {self.log_det} log-det)"
        ]
        if self.num_folded:
            lines.append(f"  warning: the flow folds at {self.num_folded} draws; their weights are not exact")
        for i, c in enumerate(self.chains):
            lines.append(f"  chain {i}: log Z = {c.log_z:.4f} +- {c.se:.4f}, ELBO {c.elbo:.4f}, "
                         f"ESS {c.ess:.0f}/{c.num_draws}, k_hat {c.k_hat:.2f}")
        return "\n".join(lines)


def _check_count(name: str, value, minimum: int = 1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _plain(obj) -> bool:
    """Whether ``obj`` can be stored in a ``weights_only`` checkpoint."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return False


def _atomic_save(state: dict, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a crash never leaves a
    half-written file at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".osds-", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_checkpoint(path: str) -> dict:
    """Reads and checks an OSDS checkpoint with ``weights_only=True`` (no pickled code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Could not read an OSDS checkpoint from {path!r}: {type(err).__name__}: {err}. "
                         "The file is truncated, corrupted or not a checkpoint.") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path!r} is not a pyro_osds OSDS checkpoint (format {found!r}, expected "
                         f"{CHECKPOINT_FORMAT!r}).")
    if state.get("version") != __version__:
        raise ValueError(f"{path!r} was written by pyro_osds {state.get('version')}, this is {__version__}; "
                         "checkpoints are only read by the version that wrote them. Retrain, or load it with "
                         f"pyro_osds=={state.get('version')}.")
    return state


class OSDS:
    r"""
    One-step diffusion sampler for Pyro models (or bare potentials): trains a step-conditioned
    probability-flow sampler on the model's unconstrained potential, draws from it in ``num_steps``
    steps and weights every draw exactly, giving posterior samples and the log evidence
    :math:`\log Z = \log p(y)` with a standard error.

    .. math::

        \log w_i = \log p(x_i, y) + \log|\det J_{T^{-1}}(x_i)| - \log q_K(z_i),
        \qquad \log\hat Z = \log\frac1N\sum_i w_i,

    where :math:`q_K` is the density of the :math:`K`-step flow (exact log-determinant of the discrete
    map, including the Langevin term).

    **Chains** are independently trained samplers (default 2, so that R-hat is defined). Their
    split-R-hat measures *between-sampler disagreement*: R-hat > 1.01 flags training variance or
    mode-selection differences; R-hat near 1 does not certify correctness (all samplers can miss the
    same mode), which is what the importance weights (ESS, k-hat, per-chain log Z) are for.

    :param model: a Pyro model. Exactly one of ``model`` and ``potential_fn``.
    :param callable potential_fn: a potential :math:`U = -\log\rho` taking a dict of unbatched
        unconstrained tensors and returning a scalar (Pyro's convention); needs ``initial_params``.
    :param dict initial_params: for ``potential_fn``: ``{name: tensor}`` (shapes, dtype, device and
        a finite starting point); for models, optional unconstrained starting values of the latent
        sites (as for :class:`~pyro.infer.MCMC`; default: ``init_strategy``). The preconditioner's fit
        starts there.
    :param int num_samples: draws per chain kept after training (1000).
    :param int num_chains: independently trained samplers (2).
    :param int num_steps: flow steps :math:`K` per draw (1; ``grid_size`` for ``method="dis"``); must
        divide ``grid_size``.
    :param str method: ``"osds"`` (default), ``"dis"``, ``"scds"`` or ``"cdds"``: the training method
        (:data:`~pyro_osds.config.METHOD_DEFAULTS`, whose table compares them); options given here
        override the method's defaults, and settings a method does not use are refused.
    :param str preset: start from a named :data:`~pyro_osds.config.PRESETS` entry (``"cpu"``,
        ``"paper"``, ``"smoke"``).
    :param OSDSConfig config: start from this configuration instead.
    :param dict transforms: site -> transform (constrained to unconstrained) overrides.
    :param bool batched_potential: ``potential_fn`` takes dicts of ``(batch, *shape)`` tensors.
    :param int max_plate_nesting: as in :class:`~pyro.infer.NUTS`.
    :param init_strategy: Pyro init strategy for the preconditioner's starting point
        (default :func:`~pyro.infer.autoguide.initialization.init_to_median`).
    :param device: train on this device (e.g. ``"cuda"``); default: where the data (or
        ``initial_params``) live.
    :param callable hook_fn: ``hook_fn(chain, step, info)`` after every training iteration.
    :param bool disable_progbar: no progress bars (also off when ``CI`` is set).
    :param checkpoint: path of a checkpoint file written atomically (write, then rename) every
        ``checkpoint_every`` training iterations and after each chain. ``KeyboardInterrupt`` or a
        crash loses at most ``checkpoint_every`` iterations.
    :param int checkpoint_every: iterations between checkpoints (100).
    :param bool resume: continue from ``checkpoint`` if the file exists (exactly where it stopped:
        the result is bit-identical to an uninterrupted run on CPU); start afresh otherwise.
    :param options: any field of :class:`~pyro_osds.config.OSDSConfig` (e.g. ``num_iterations``,
        ``batch_size``, ``learning_rate``, ``precondition``); unknown names raise ``TypeError``.

    **Example**::

        >>> osds = OSDS(model, num_samples=1000).run(X, y)  # doctest: +SKIP
        >>> osds.get_samples()["w"].shape  # doctest: +SKIP
        >>> print(osds.log_evidence())  # doctest: +SKIP

    **References**

    [1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, arXiv 2512.05251.
    [2] `Single-Step Consistent Diffusion Samplers`, J. Jutras-Dube, P. Pynadath, R. Zhang (2025),
        arXiv 2502.07579.
    """

    def __init__(
        self,
        model=None,
        potential_fn: Callable | None = None,
        *,
        initial_params: dict | None = None,
        num_samples: int = 1000,
        num_chains: int = 2,
        num_steps: int | None = None,
        method: str | None = None,
        preset: str | None = None,
        config: OSDSConfig | None = None,
        transforms: dict | None = None,
        batched_potential: bool = False,
        max_plate_nesting: int | None = None,
        init_strategy=None,
        device: str | torch.device | None = None,
        hook_fn: Callable | None = None,
        disable_progbar: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        resume: bool = False,
        **options,
    ):
        if (model is None) == (potential_fn is None):
            raise ValueError("Only one of `model` or `potential_fn` must be specified.")
        if model is not None and not callable(model):
            raise TypeError(f"`model` must be a callable Pyro model, got {type(model).__name__}.")
        if potential_fn is not None and initial_params is None:
            raise ValueError("`initial_params` must be provided with `potential_fn`, e.g. "
                             "`initial_params={'x': torch.zeros(3)}` (as for Pyro's HMC/NUTS).")
        _check_count("num_samples", num_samples)
        _check_count("num_chains", num_chains)
        if num_steps is not None:
            _check_count("num_steps", num_steps)
        _check_count("checkpoint_every", checkpoint_every)
        if resume and checkpoint is None:
            raise ValueError("`resume=True` needs `checkpoint=<path>` (the file to resume from and write to).")
        if preset is not None and config is not None:
            raise ValueError("Give at most one of `preset` and `config`.")
        check_option_names(options)
        base = OSDSConfig.preset(preset) if preset is not None else (config or OSDSConfig())
        if not isinstance(base, OSDSConfig):
            raise TypeError(f"`config` must be an OSDSConfig, got {type(base).__name__}.")
        if method is not None and method != base.method:
            config = OSDSConfig.for_method(method, base, **options)
        else:
            config = base.replace(**options)
        if num_steps is None:
            num_steps = config.grid_size if config.method == "dis" else 1
        if config.grid_size % num_steps:
            raise ValueError(f"`num_steps`={num_steps} does not divide the fine grid `grid_size`="
                             f"{config.grid_size}; use a divisor such as 1, 2, 4.")
        if config.flow_kl_weight > 0 and num_steps not in config.flow_kl_steps:
            # the one-step objective trains the step counts it is asked for: include the one we draw with
            config = config.replace(flow_kl_steps=tuple(sorted({*config.flow_kl_steps, num_steps})))
        self.config = config
        self.model = model
        self.potential_fn = potential_fn
        self.initial_params = initial_params
        self.num_samples = num_samples
        self.num_chains = num_chains
        self.num_steps = num_steps
        self.transforms = transforms
        self.batched_potential = batched_potential
        self.max_plate_nesting = max_plate_nesting
        self.init_strategy = init_strategy
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device={device!r}` was asked for but CUDA is not available here; use `device='cpu'` "
                             "(or leave `device` unset to follow the data).")
        self.hook_fn = hook_fn
        self.disable_progbar = disable_progbar
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self._chain_seeds: list[int] = []
        self.target: ModelTarget | PotentialTarget | None = None
        self.samplers: list[FlowSampler] = []
        self._draws: list[Draws] = []
        self._discrete: dict[str, torch.Tensor] = {}
        self._args: tuple = ()
        self._kwargs: dict = {}
        self.interrupted = False

    # ------------------------------------------------------------------------------------------
    # setting up
    def _build_target(self, args, kwargs):
        if self.model is not None:
            device = self.device or ModelTarget.data_device(args, kwargs)
            if device is not None and self.device is not None:
                args, kwargs = ModelTarget.move_args(args, kwargs, device)
            self._args, self._kwargs = args, kwargs
            target = ModelTarget(self.model, args, kwargs, max_plate_nesting=self.max_plate_nesting,
                                 init_strategy=self.init_strategy, transforms=self.transforms,
                                 initial_params=self.initial_params)
        else:
            if args or kwargs:
                raise TypeError("`run()` takes no model arguments when OSDS wraps a `potential_fn`.")
            params = self.initial_params
            if self.device is not None and isinstance(params, dict):
                params = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in params.items()}
            target = PotentialTarget(self.potential_fn, params, transforms=self.transforms,
                                     batched=self.batched_potential)
        return target

    def _new_sampler(self, chain: int) -> FlowSampler:
        def hook(step, info, chain=chain):
            if self.hook_fn is not None:
                self.hook_fn(chain, step, info)
            if self.checkpoint is not None and step % self.checkpoint_every == 0:
                self._write_checkpoint()

        generator = torch.Generator(device=self.target.device)
        generator.manual_seed(self._chain_seeds[chain])
        sampler_class = ConsistencySampler if self.config.method == "cdds" else FlowSampler
        return sampler_class(self.target.potential, self.target.init, self.config, generator=generator, hook_fn=hook,
                             disable_progbar=self.disable_progbar,
                             desc=f"OSDS chain {chain}" if self.num_chains > 1 else "OSDS")

    def fit(self, *args, **kwargs) -> OSDS:
        r"""
        Trains ``num_chains`` independent samplers on the model's potential (model arguments are
        passed through as to ``MCMC.run``). Returns ``self``.

        With ``checkpoint`` set, progress is saved periodically; with ``resume=True`` an existing
        checkpoint is continued. ``KeyboardInterrupt`` stops training and keeps the last completed
        iteration of every chain started so far (with a warning); call :meth:`continue_training`
        to go on.
        """
        with poutine.block():
            self.target = self._build_target(args, kwargs)
            self.samplers, self._draws, self._discrete = [], [], {}
            state = self._read_resume_state()
            if state is not None:
                self._restore_training_state(state)
            else:
                # one seed per chain, drawn up front from the global RNG (pyro.set_rng_seed):
                # independent streams, and a resumed run can recreate the chains it had not started
                self._chain_seeds = [int(torch.randint(0, 2**62, ())) for _ in range(self.num_chains)]
            self._train_chains()
        return self

    def continue_training(self, num_iterations: int | None = None) -> OSDS:
        r"""
        Continues training every chain up to ``num_iterations`` iterations in total (default: the
        configured ``num_iterations``), e.g. after an interruption or on a sampler from
        :meth:`load`. Chains not started yet are trained from scratch. Returns ``self``; call
        :meth:`sample` for fresh draws.
        """
        self._require_fitted()
        if num_iterations is not None:
            _check_count("num_iterations", num_iterations)
            self.config = self.config.replace(num_iterations=num_iterations)
            for sampler in self.samplers:
                sampler.config = self.config
                if sampler.trainer is not None:
                    sampler.trainer.config = self.config
        with poutine.block():
            self._train_chains()
        return self

    def _train_chains(self) -> None:
        self.interrupted = False
        for chain in range(self.num_chains):
            if chain < len(self.samplers):
                sampler = self.samplers[chain]
            else:
                sampler = self._new_sampler(chain)
                self.samplers.append(sampler)
            with self._explain_out_of_memory("training"):
                sampler.fit()
            if self.checkpoint is not None:
                self._write_checkpoint()
            if sampler.interrupted:
                self.interrupted = True
                warnings.warn(
                    f"Training was interrupted in chain {chain} at iteration {sampler.trainer.step}; "
                    f"{len(self.samplers)} of {self.num_chains} chains are kept (the last one partially trained). "
                    "Call `continue_training()` to finish.",
                    RuntimeWarning, stacklevel=3,
                )
                break

    def run(self, *args, **kwargs) -> OSDS:
        """Trains (:meth:`fit`) and draws ``num_samples`` per chain (:meth:`sample`). Returns ``self``."""
        return self.fit(*args, **kwargs).sample()

    @contextlib.contextmanager
    def _explain_out_of_memory(self, what: str):
        try:
            yield
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"Out of accelerator memory while {what}. Reduce `batch_size` (now {self.config.batch_size}) or "
                f"`chunk_size` (now {self.config.chunk_size}), use fewer draws, or run on the CPU "
                f"(`device='cpu'`). Training progress up to the last completed iteration is kept"
                + (f" and checkpointed in {self.checkpoint!r}." if self.checkpoint else ".")
            ) from err

    def _require_fitted(self):
        if not self.samplers:
            raise RuntimeError("Call `run(...)` (or `fit(...)`) first.")

    def sample(self, num_samples: int | None = None, num_steps: int | None = None, *, log_det: str | None = None
               ) -> OSDS:
        r"""
        Draws ``num_samples`` fresh weighted draws per chain from the trained samplers with a
        ``num_steps``-step flow (any divisor of ``grid_size``), replacing the stored draws that
        :meth:`get_samples`, :meth:`log_evidence` and :meth:`to_inference_data` use. Returns ``self``.
        """
        self._require_fitted()
        num_samples = self.num_samples if num_samples is None else num_samples
        num_steps = self.num_steps if num_steps is None else num_steps
        _check_count("num_samples", num_samples)
        _check_count("num_steps", num_steps)
        self.samplers[0].process.step_codes(num_steps)  # num_steps must divide the grid
        if self.config.diffusion_weight == 0 and num_steps not in self.config.flow_kl_steps:
            warnings.warn(
                f"The {num_steps}-step flow was not trained (trained step counts: {self.config.flow_kl_steps}); its "
                "draws are still weighted exactly, but expect a poor ESS or folds. Train it with "
                f"`OSDS(..., num_steps={num_steps})` or `flow_kl_steps=(..., {num_steps})`, or use the paper's "
                "objective (`preset='paper-cpu'`), which trains every step size.",
                UserWarning, stacklevel=2,
            )
        with poutine.block(), self._explain_out_of_memory("drawing"):
            self._draws = [s.draw(num_samples, num_steps, log_det=log_det) for s in self.samplers]
            self._discrete = {}
            if isinstance(self.target, ModelTarget) and self.target.enumerated_sites:
                self._discrete = self.target.sample_discrete(torch.cat([d.x for d in self._draws]))
        self.num_samples, self.num_steps = num_samples, num_steps
        for i, (sampler, d) in enumerate(zip(self.samplers, self._draws, strict=True)):
            sampler.warn_lost_modes(d, label=f"Chain {i}: ")
            if d.num_folded:
                warnings.warn(f"Chain {i}: the {num_steps}-step flow folds (its Jacobian changes orientation) at "
                              f"{d.num_folded} of {num_samples} draws, so their importance weights are not exact. "
                              "Train longer or use more steps.", RuntimeWarning, stacklevel=2)
        return self

    # ------------------------------------------------------------------------------------------
    # results
    def _require_draws(self):
        self._require_fitted()
        if not self._draws:
            raise RuntimeError("No draws yet: call `sample()` (or `run(...)`).")

    def _log_weights(self) -> torch.Tensor:
        """``(num_chains, num_samples)`` float64 log-weights."""
        return torch.stack([d.log_weight for d in self._draws])

    def get_samples(self, num_samples: int | None = None, group_by_chain: bool = False, *, resample: bool = False,
                    unconstrained: bool = False) -> dict[str, torch.Tensor]:
        r"""
        Draws in constrained space (sites in sorted order), shaped ``(chains * draws, *site_shape)``
        or ``(chains, draws, *site_shape)`` with ``group_by_chain``.

        The draws come from the sampler :math:`q` and carry importance weights
        (:meth:`get_normalized_weights`). With ``resample=True`` they are resampled
        (multinomially, per chain when grouped) in proportion to their weights, giving equally
        weighted draws of the posterior whose effective size is the weights' ESS, not the count
        (a warning says so when it is small). ``num_samples`` picks that many draws (per chain
        when grouped) at random, as :meth:`pyro.infer.MCMC.get_samples` does.
        """
        self._require_draws()
        z = torch.stack([d.x for d in self._draws])  # (C, N, D)
        C, N, D = z.shape
        if resample:
            lw = self._log_weights()
            if group_by_chain:
                probs = torch.softmax(lw, -1)
                idx = torch.multinomial(probs.to(torch.float64), N, replacement=True).to(z.device)
                z = torch.gather(z, 1, idx.unsqueeze(-1).expand(C, N, D))
            else:
                probs = torch.softmax(lw.reshape(-1), -1)
                idx = torch.multinomial(probs.to(torch.float64), C * N, replacement=True).to(z.device)
                z = z.reshape(C * N, D)[idx].reshape(C, N, D)
            ess = float(kish_ess(lw.reshape(-1)))
            if ess < 0.1 * C * N:
                warnings.warn(f"Resampled draws carry only about {ess:.0f} effective samples (Kish ESS of the "
                              f"weights) out of {C * N}.", RuntimeWarning, stacklevel=2)
        if num_samples is not None:
            _check_count("num_samples", num_samples)
            if group_by_chain:
                idx = torch.stack([torch.randperm(N)[: min(num_samples, N)] for _ in range(C)]).to(z.device)
                z = torch.gather(z, 1, idx.unsqueeze(-1).expand(C, idx.shape[1], D))
            else:
                flat = z.reshape(C * N, D)
                z = flat[torch.randperm(C * N)[: min(num_samples, C * N)].to(z.device)].unsqueeze(0)
        lead = z.shape[:2]
        flat = z.reshape(-1, D)
        values = self.target.unpack(flat) if unconstrained else self.target.constrain(flat)
        if not group_by_chain:
            lead = (lead[0] * lead[1],)
        out = OrderedDict()
        for name in sorted(values):
            out[name] = values[name].reshape(lead + tuple(values[name].shape[1:])).detach()
        if self._discrete and not resample and num_samples is None:
            for name, v in self._discrete.items():
                out[name] = v.reshape(lead + tuple(v.shape[1:]))
        return out

    def log_evidence(self) -> LogEvidence:
        r"""Log evidence :math:`\log\hat Z` with standard error, ELBO, ESS and k-hat, pooled and per chain."""
        self._require_draws()
        if any(d.log_det == "none" for d in self._draws):
            raise EvidenceError(
                f"The current draws ({self.config.method}, {self.num_steps} steps) carry no importance weights "
                "(multi-step consistency sampling re-noises, so its draws have no tractable density). Draw with "
                "`sample(num_steps=1)` to estimate the evidence."
            )
        chains = tuple(evidence(d.log_weight, num_folded=d.num_folded, log_det=d.log_det) for d in self._draws)
        pooled: Estimates = pool_estimates([d.log_weight for d in self._draws],
                                           num_folded=sum(c.num_folded for c in chains), log_det=self._draws[0].log_det)
        return LogEvidence(
            log_z=pooled.log_z, se=pooled.se, elbo=pooled.elbo, elbo_se=pooled.elbo_se, ess=pooled.ess,
            ess_per_draw=pooled.ess_per_draw, k_hat=pooled.k_hat, num_draws=pooled.num_draws,
            num_folded=pooled.num_folded, num_nonfinite=pooled.num_nonfinite, log_det=pooled.log_det,
            num_steps=self.num_steps, chains=chains,
        )

    # Pyro's LogWeightsMixin names
    def get_log_normalizer(self) -> torch.Tensor:
        """Pooled :math:`\\log\\hat Z` as a tensor (Pyro's :class:`~pyro.infer.Importance` name)."""
        return torch.tensor(self.log_evidence().log_z, dtype=torch.float64)

    def get_ESS(self) -> torch.Tensor:  # noqa: N802 - Pyro's name
        """Kish effective sample size of the pooled weights (Pyro's :class:`~pyro.infer.Importance` name)."""
        self._require_draws()
        return kish_ess(self._log_weights().reshape(-1))

    def get_normalized_weights(self, log_scale: bool = False) -> torch.Tensor:
        """Self-normalised weights of the pooled draws (order of :meth:`get_samples`)."""
        self._require_draws()
        lw = self._log_weights().reshape(-1)
        lw = lw - torch.logsumexp(lw, 0)
        return lw if log_scale else lw.exp()

    def diagnostics(self) -> dict:
        """
        Per-site ``n_eff`` (Kish ESS of the weights) and ``r_hat`` (split-R-hat between independently
        trained chains), plus per-chain evidence diagnostics and ``divergences`` (always empty; kept
        for tools that expect MCMC's layout).
        """
        self._require_draws()
        samples = self.get_samples(group_by_chain=True)
        ess = float(self.get_ESS())
        out: dict = OrderedDict()
        for name, value in samples.items():
            if not value.is_floating_point():
                continue
            r_hat = split_gelman_rubin(value.to(torch.float64)) if value.shape[0] > 1 else torch.full(
                value.shape[2:], math.nan)
            out[name] = OrderedDict([("n_eff", torch.full(value.shape[2:], ess)), ("r_hat", r_hat)])
        ev = self.log_evidence()
        out["divergences"] = {f"chain {i}": [] for i in range(len(self._draws))}
        out["log_evidence"] = {f"chain {i}": c.log_z for i, c in enumerate(ev.chains)}
        out["ess"] = {f"chain {i}": c.ess for i, c in enumerate(ev.chains)}
        out["k_hat"] = {f"chain {i}": c.k_hat for i, c in enumerate(ev.chains)}
        out["folded"] = {f"chain {i}": c.num_folded for i, c in enumerate(ev.chains)}
        out["skipped_steps"] = {f"chain {i}": (s.trainer.num_skipped if s.trainer else 0)
                                for i, s in enumerate(self.samplers)}
        return out

    def summary_dict(self, prob: float = 0.9) -> dict:
        """Importance-weighted posterior summary per site (the numbers :meth:`summary` prints)."""
        self._require_draws()
        if not 0 < prob < 1:
            raise ValueError(f"`prob` must be in (0, 1), got {prob!r}.")
        grouped = self.get_samples(group_by_chain=True)
        log_w = self._log_weights().reshape(-1)
        w = torch.softmax(log_w, 0)
        ess = float(kish_ess(log_w))
        lo, hi = 0.5 * (1 - prob), 0.5 * (1 + prob)
        out = OrderedDict()
        for name, value in grouped.items():
            v = value.reshape((-1,) + tuple(value.shape[2:])).to(torch.float64)
            ww = w.reshape((-1,) + (1,) * (v.dim() - 1)).to(v.device)
            mean = (ww * v).sum(0)
            std = ((ww * (v - mean) ** 2).sum(0)).sqrt()
            q = weighed_quantile(v, [lo, 0.5, hi], log_w.to(v.device), dim=0)
            r_hat = (split_gelman_rubin(value.to(torch.float64)) if value.shape[0] > 1
                     else torch.full(mean.shape, math.nan))
            out[name] = OrderedDict([("mean", mean), ("std", std), ("median", q[1]), (f"{100 * lo:.1f}%", q[0]),
                                     (f"{100 * hi:.1f}%", q[2]), ("n_eff", torch.full(mean.shape, ess)),
                                     ("r_hat", r_hat)])
        return out

    def summary(self, prob: float = 0.9) -> None:
        """
        Prints Pyro's summary table with importance-weighted statistics (``n_eff`` = Kish ESS of the
        weights, ``r_hat`` between chains), followed by the evidence lines.
        """
        stats = self.summary_dict(prob)
        names = []
        for name, d in stats.items():
            shape = d["mean"].shape
            names += [name] if len(shape) == 0 else [name + "[" + ",".join(map(str, i)) + "]"
                                                     for i in product(*map(range, shape))]
        width = max([len(n) for n in names] + [10])
        head = "{:>" + str(width) + "}" + " {:>9}" * 7
        row = "{:>" + str(width) + "}" + " {:>9.2f}" * 7
        print()
        print(head.format("", *next(iter(stats.values())).keys()))
        for name, d in stats.items():
            shape = d["mean"].shape
            if len(shape) == 0:
                print(row.format(name, *[float(v) for v in d.values()]))
            else:
                for idx in product(*map(range, shape)):
                    print(row.format(name + "[" + ",".join(map(str, idx)) + "]", *[float(v[idx]) for v in d.values()]))
        print()
        print(self.log_evidence())
        print()

    # ------------------------------------------------------------------------------------------
    # ArviZ
    def to_datatree(self, *, resample: bool = False, log_likelihood: bool = True, coords: dict | None = None,
                    dims: dict | None = None):
        """The results as an :class:`xarray.DataTree` (ArviZ >= 1 data model); see :func:`pyro_osds.convert.to_datatree`."""
        from .convert import to_datatree

        return to_datatree(self, resample=resample, log_likelihood=log_likelihood, coords=coords, dims=dims)

    def to_inference_data(self, *, resample: bool = False, log_likelihood: bool = True, coords: dict | None = None,
                          dims: dict | None = None):
        """
        The results as ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ >= 1); see
        :func:`pyro_osds.convert.to_inference_data`. Groups ``posterior``, ``sample_stats`` (``lp``,
        ``log_q``, ``log_weight``, per-chain ``log_marginal_likelihood``), ``log_likelihood``,
        ``observed_data``; root attrs ``log_marginal_likelihood`` and ``log_marginal_likelihood_se``.
        """
        from .convert import to_inference_data

        return to_inference_data(self, resample=resample, log_likelihood=log_likelihood, coords=coords, dims=dims)

    @property
    def kernel(self):
        """``self``: lets ArviZ 0.x's ``az.from_pyro(osds)`` read ``osds.kernel.model`` as for ``MCMC``."""
        return self

    # ------------------------------------------------------------------------------------------
    # persistence
    def state_dict(self) -> dict:
        """Everything :meth:`save` writes: tensors and plain Python values only."""
        self._require_fitted()
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "kind": "model" if self.model is not None else "potential",
            "config": self.config.as_dict(),
            "num_samples": self.num_samples,
            "num_chains": self.num_chains,
            "num_steps": self.num_steps,
            "dim": self.target.dim,
            "sites": [[s.name, list(s.shape)] for s in self.target.sites],
            "chain_seeds": list(self._chain_seeds),
            "samplers": [s.state_dict() for s in self.samplers],
            "draws": [
                {"x": d.x, "potential": d.potential, "log_q": d.log_q, "log_weight": d.log_weight,
                 "orientation": d.orientation, "log_det": d.log_det} for d in self._draws
            ],
            "discrete": dict(self._discrete),
        }
        if self.model is not None and _plain(list(self._args)) and _plain(self._kwargs):
            state["model_args"] = list(self._args)
            state["model_kwargs"] = dict(self._kwargs)
        if self.model is None:
            state["initial_params"] = {k: v.detach().cpu() for k, v in self.initial_params.items()}
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Saves the trained samplers, their draws and the configuration (atomically: write, then rename).
        The file holds tensors and plain Python values only and loads with ``weights_only=True``."""
        _atomic_save(self.state_dict(), os.fspath(path))

    def _write_checkpoint(self) -> None:
        _atomic_save(self.state_dict(), self.checkpoint)

    def _read_resume_state(self) -> dict | None:
        if not self.resume or not os.path.exists(self.checkpoint):
            return None
        state = _read_checkpoint(self.checkpoint)
        self._check_compatible(state)
        return state

    def _check_compatible(self, state: dict) -> None:
        kind = "model" if self.model is not None else "potential"
        if state["kind"] != kind:
            raise ValueError(f"The checkpoint was made for a {state['kind']}, not a {kind}.")
        sites = [[s.name, list(s.shape)] for s in self.target.sites]
        saved_sites = [[name, list(shape)] for name, shape in state["sites"]]
        if sites != saved_sites:
            raise ValueError(f"The checkpoint's latent sites {saved_sites} do not match this model's {sites}; "
                             "it was saved from a different model.")
        mine = self.config.as_dict()
        diffs = {k: (state["config"].get(k), v) for k, v in mine.items()
                 if k not in RESUMABLE_CHANGES and state["config"].get(k) != v}
        if diffs:
            raise ValueError(
                "The checkpoint was trained with different settings, which cannot be resumed: "
                + ", ".join(f"{k} (checkpoint {a!r}, now {b!r})" for k, (a, b) in diffs.items())
                + f". Only {sorted(RESUMABLE_CHANGES)} may change."
            )
        if state["num_chains"] != self.num_chains:
            raise ValueError(f"The checkpoint has {state['num_chains']} chains, this run asks for {self.num_chains}.")

    def _restore_training_state(self, state: dict) -> None:
        """Rebuilds the samplers (and draws) from a checkpoint; ``self.target`` must be built."""
        self._chain_seeds = [int(s) for s in state["chain_seeds"]]
        self.samplers = []
        for chain, sampler_state in enumerate(state["samplers"]):
            sampler = self._new_sampler(chain)
            sampler.load_state_dict(sampler_state)
            self.samplers.append(sampler)
        device = self.target.device
        self._draws = [
            Draws(d["x"].to(device), d["potential"].to(device), d["log_q"].to(device), d["log_weight"],
                  None if d["orientation"] is None else d["orientation"].to(device), d["log_det"])
            for d in state["draws"]
        ]
        self._discrete = dict(state.get("discrete", {}))

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, potential_fn: Callable | None = None, *,
             model_args: tuple | None = None, model_kwargs: dict | None = None, **kwargs) -> OSDS:
        r"""
        Loads a sampler saved with :meth:`save` or a training checkpoint (safely:
        ``torch.load(weights_only=True)``, no pickled code runs). Give the same ``model`` (or
        ``potential_fn``); its data are taken from the checkpoint when they were stored (plain
        tensors), else pass ``model_args`` / ``model_kwargs``. The model's latent sites must match
        the checkpoint's. ``kwargs`` go to the constructor (e.g. ``transforms``, ``device``,
        ``checkpoint``). An unfinished training run continues with :meth:`continue_training`.
        """
        state = _read_checkpoint(os.fspath(path))
        if (model is None) == (potential_fn is None):
            raise ValueError("Only one of `model` or `potential_fn` must be specified.")
        kind = "model" if model is not None else "potential"
        if state["kind"] != kind:
            raise ValueError(f"The checkpoint was made for a {state['kind']}, not a {kind}.")
        config = OSDSConfig().replace(**state["config"])
        init_params = kwargs.pop("initial_params", None) or state.get("initial_params")
        osds = cls(model, potential_fn, initial_params=init_params, num_samples=state["num_samples"],
                   num_chains=state["num_chains"], num_steps=state["num_steps"], config=config, **kwargs)
        args, kw = (), {}
        if kind == "model":
            if model_args is None and model_kwargs is None:
                if "model_args" not in state:
                    raise ValueError("The checkpoint does not hold the model's data (they were not plain tensors); "
                                     "pass `model_args=` / `model_kwargs=`.")
                model_args, model_kwargs = tuple(state["model_args"]), state["model_kwargs"]
            args, kw = tuple(model_args or ()), dict(model_kwargs or {})
        osds.config = config  # exactly the checkpoint's (the constructor may have added num_steps to flow_kl_steps)
        with poutine.block():
            osds.target = osds._build_target(args, kw)
            osds._check_compatible(state)
            osds._restore_training_state(state)
        return osds

    # ------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        what = getattr(self.model, "__name__", "model") if self.model is not None else "potential_fn"
        status = "trained" if self.samplers else "not trained"
        return (f"OSDS({what}, num_chains={self.num_chains}, num_samples={self.num_samples}, "
                f"num_steps={self.num_steps}; {status})")

