# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The public runner :class:`OSDS`: a drop-in replacement for ``MCMC(NUTS(model)).run(...)`` that returns posterior
draws *and* the model's log evidence. It schedules: builds the flat target (:mod:`pyro_osds.model`,
:mod:`pyro_osds.target`), trains one chain (:mod:`pyro_osds.samplers`) per ``num_chains`` by the chain mapper
(:mod:`pyro_osds.chains`), draws, checks the draws once (:mod:`pyro_osds.checks`) and keeps checkpoints
(:mod:`pyro_osds.checkpoint`); what the draws give (samples, evidence, summaries, ArviZ data) is
:class:`~pyro_osds.posterior.WeightedPosterior`'s.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable

import torch
from pyro import poutine

from . import checkpoint as ckpt
from . import distributed
from .budget import draw_to_target
from .chains import (
    OUT_OF_TIME,
    check_chain_method,
    choose_chain_method,
    map_chains,
    out_of_memory_advice,
    warn_interrupted,
)
from .checks import check_draws, diagnostic_references, warn_untrained_step_count
from .config import OSDSConfig
from .cost import CostMeter
from .distributed import DistributedContext, broadcast_object
from .model import build_target
from .posterior import WeightedPosterior
from .results import Draws, LogEvidence
from .samplers import Chain, build_sampler, restore_sampler
from .target import FlatTarget
from .util import check_positive_int, derive_seed, seeded_generator

__all__ = ["OSDS", "LogEvidence"]


def _check_arguments(model, potential_fn, initial_params, *, num_samples, num_chains, checkpoint_every, chain_method,
                     hook_fn, checkpoint, resume, device) -> None:
    """Raises a ``ValueError`` (``TypeError``) naming the :class:`OSDS` argument that is wrong and the fix."""
    if (model is None) == (potential_fn is None):
        raise ValueError("Only one of `model` or `potential_fn` must be specified.")
    if model is not None and not callable(model):
        raise TypeError(f"`model` must be a callable Pyro model, got {type(model).__name__}.")
    if potential_fn is not None and initial_params is None:
        raise ValueError("`initial_params` must be provided with `potential_fn`, e.g. "
                         "`initial_params={'x': torch.zeros(3)}` (as for Pyro's HMC/NUTS).")
    for name, value in (("num_samples", num_samples), ("num_chains", num_chains), ("checkpoint_every", checkpoint_every)):
        check_positive_int(name, value)
    check_chain_method(chain_method, hook_fn=hook_fn, checkpoint=checkpoint)
    if resume and checkpoint is None:
        raise ValueError("`resume=True` needs `checkpoint=<path>` (the file to resume from and write to).")
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device={device!r}` was asked for but CUDA is not available here; use `device='cpu'` "
                         "(or leave `device` unset to follow the data).")


class OSDS(WeightedPosterior):
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

    **Chains** are independently trained samplers (default 2): their R-hat measures *disagreement* (training
    variance, mode selection), not correctness, which is what the importance weights are for.

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
        divide ``grid_size``; the one-step objective trains it.
    :param str method: ``"osds"`` (default), ``"dis"``, ``"scds"`` or ``"cdds"``: the training method
        (:data:`~pyro_osds.config.METHOD_DEFAULTS`); options given here override the method's defaults.
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
    :param str chain_method: how the chains train: ``"auto"`` (default; what it picks:
        :func:`~pyro_osds.chains.choose_chain_method`), ``"sequential"``, ``"threads"`` or ``"processes"``. Each
        chain has its own random stream: the result is the same either way.
    :param callable hook_fn: ``hook_fn(chain, step, info)`` after every training iteration (from the chain's
        thread when chains train in threads).
    :param bool disable_progbar: no progress bars (also off when ``CI`` is set).
    :param checkpoint: path of a checkpoint file written atomically (write, then rename) every
        ``checkpoint_every`` training iterations and after each chain. ``KeyboardInterrupt`` or a
        crash loses at most ``checkpoint_every`` iterations.
    :param int checkpoint_every: iterations between checkpoints (100).
    :param bool resume: continue from ``checkpoint`` if the file exists (exactly where it stopped:
        the result is bit-identical to an uninterrupted run on CPU); start afresh otherwise.
    :param options: any flat option of :class:`~pyro_osds.config.OSDSConfig` (e.g. ``num_iterations``,
        ``batch_size``, ``learning_rate``, ``precondition``); unknown names raise ``TypeError``.

    **Example**::

        >>> osds = OSDS(model, num_samples=1000).run(X, y)  # doctest: +SKIP
        >>> osds.get_samples()["w"].shape  # doctest: +SKIP
        >>> print(osds.log_evidence())  # doctest: +SKIP

    **References**

    [1] `One-Step Diffusion Samplers via Self-Distillation and Deterministic Flow`, P. Jutras-Dubé, J. Zhang,
        Z. Wang, R. Zhang (2025), arXiv 2512.05251.

    [2] `Single-Step Consistent Diffusion Samplers`, P. Jutras-Dubé, P. Pynadath, R. Zhang (2025), arXiv 2502.07579.
    """

    def __init__(self, model=None, potential_fn: Callable | None = None, *, initial_params: dict | None = None,
                 num_samples: int = 1000, num_chains: int = 2, num_steps: int | None = None, method: str | None = None,
                 preset: str | None = None, config: OSDSConfig | None = None, transforms: dict | None = None,
                 batched_potential: bool = False, max_plate_nesting: int | None = None, init_strategy=None,
                 device: str | torch.device | None = None, chain_method: str = "auto", hook_fn: Callable | None = None,
                 disable_progbar: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 100, resume: bool = False, **options):
        _check_arguments(model, potential_fn, initial_params, num_samples=num_samples, num_chains=num_chains,
                         checkpoint_every=checkpoint_every, chain_method=chain_method, hook_fn=hook_fn,
                         checkpoint=checkpoint, resume=resume, device=device)
        if num_steps is not None:
            options["num_steps"] = num_steps
        #: the sampler's settings, nested by owner (:class:`~pyro_osds.config.OSDSConfig`)
        self.config = OSDSConfig.resolve(preset=preset, config=config, method=method, **options)
        self.model, self.potential_fn, self.initial_params = model, potential_fn, initial_params
        self.num_samples, self.num_chains = num_samples, num_chains
        #: the flow step count of the current draws (and of the next :meth:`sample`'s)
        self.num_steps = self.config.default_num_steps
        self.transforms, self.batched_potential = transforms, batched_potential
        self.max_plate_nesting, self.init_strategy = max_plate_nesting, init_strategy
        self.device = None if device is None else torch.device(device)
        self.chain_method, self.hook_fn, self.disable_progbar = chain_method, hook_fn, disable_progbar
        # one chain at a time in the model's potential (Pyro's handler stack is global); the stop of Ctrl-C
        self._potential_lock, self._stop_training = threading.RLock(), threading.Event()
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.chain_seeds: list[int] = []
        #: the process group training and drawing are shared over (set by :meth:`fit`; ``None``: one process)
        self.distributed: DistributedContext | None = None
        self.target: FlatTarget | None = None
        self._chains: dict[int, Chain] = {}
        #: the current draws, one :class:`~pyro_osds.results.Draws` per chain (empty before :meth:`sample`)
        self.draws: tuple[Draws, ...] = ()
        self.model_args, self.model_kwargs, self.interrupted, self._deadline = (), {}, False, None

    @property
    def samplers(self) -> list[Chain]:
        """The chains built so far, in order (chains ``0 .. k-1``)."""
        return [self._chains[i] for i in itertools.takewhile(self._chains.__contains__, itertools.count())]

    # ------------------------------------------------------------------------------------------
    # training
    def setup(self, *args, **kwargs) -> OSDS:
        """Builds the flat target of the model called with these arguments (:meth:`fit` does this first)."""
        with poutine.block():
            self.target, self.model_args, self.model_kwargs = build_target(
                self.model, self.potential_fn, args, kwargs, initial_params=self.initial_params, device=self.device,
                transforms=self.transforms, batched_potential=self.batched_potential, noncentering=self.config.reparam,
                max_plate_nesting=self.max_plate_nesting, init_strategy=self.init_strategy)
        return self

    def fit(self, *args, **kwargs) -> OSDS:
        r"""
        Trains ``num_chains`` independent samplers on the model's potential (arguments as to ``MCMC.run``); with
        ``resume=True`` an existing ``checkpoint`` is continued. ``KeyboardInterrupt`` (or ``max_time``) keeps every
        chain's last completed iteration (with a warning): :meth:`continue_training` goes on. Returns ``self``.
        """
        self._deadline = self.config.budget.deadline(time.time())
        self.setup(*args, **kwargs)
        self.distributed = distributed.process_group(self.config)
        self._chains, self.draws = {}, ()
        if self.resume and os.path.exists(self.checkpoint):
            self.load_state_dict(ckpt.read(self.checkpoint))
        else:
            # one seed per chain, drawn up front from the global RNG (pyro.set_rng_seed): independent streams,
            # and a resumed run can recreate the chains it had not started
            self.chain_seeds = [derive_seed() for _ in range(self.num_chains)]
            if self.distributed is not None:  # rank 0's seeds: every rank trains the same chains
                self.chain_seeds = broadcast_object(self.chain_seeds, self.distributed)
        self._train_chains()
        return self

    def continue_training(self, num_iterations: int | None = None) -> OSDS:
        r"""
        Continues training every chain up to ``num_iterations`` iterations in total (default: the configured
        ``num_iterations``), e.g. after an interruption or on a sampler from :meth:`load`. Chains not started yet
        are trained from scratch. Returns ``self``; call :meth:`sample` for fresh draws.
        """
        self._require_fitted()
        if num_iterations is not None:
            check_positive_int("num_iterations", num_iterations)
            self.config = self.config.replace(num_iterations=num_iterations)
        self._deadline = self.config.budget.deadline(time.time())
        self._join(distributed.process_group(self.config))
        self._train_chains()
        return self

    def run(self, *args, **kwargs) -> OSDS:
        """Trains (:meth:`fit`) and draws ``num_samples`` per chain (:meth:`sample`). Returns ``self``."""
        return self.fit(*args, **kwargs).sample()

    def _train_chains(self) -> None:
        """Trains the unfinished chains by the chain mapper (:func:`~pyro_osds.chains.map_chains`)."""
        method, num_workers = choose_chain_method(self.chain_method, self.num_chains, device=self.target.device,
                                                  checkpoint=self.checkpoint, distributed=self.distributed,
                                                  hook_fn=self.hook_fn)
        self.interrupted = False
        try:
            with poutine.block():  # the model's sites stay out of any handler of the caller's
                map_chains(self._train_chain, self.num_chains, method, num_workers=num_workers,
                           stop=self._stop_training, to_state=lambda chain: chain.state_dict(),
                           from_state=self._new_chain)
        finally:
            self._chains = dict(enumerate(self.samplers))  # chains 0 .. k-1 (a prefix: resuming needs one)
        self.interrupted = warn_interrupted(self.samplers, self.num_chains)

    def _train_chain(self, chain: int) -> Chain:
        """Chain ``chain`` (built if new) trained up to the configured budget, then checkpointed."""
        sampler = self._chains[chain] if chain in self._chains else self._new_chain(chain)
        with out_of_memory_advice("training", self.config, self.checkpoint):
            sampler.fit(until=self.config.optim.num_iterations)
        if self.checkpoint is not None and self._is_main:
            ckpt.atomic_save(self.state_dict(), self.checkpoint)
        return sampler

    def _new_chain(self, chain: int, state: dict | None = None) -> Chain:
        """Chain ``chain``, built afresh (its mode search picks one flow or a mixture with a component per mode,
        :func:`~pyro_osds.samplers.build_sampler`) or restored from ``state``, and registered."""
        def on_iteration(step):
            if self.checkpoint is not None and step % self.checkpoint_every == 0 and self._is_main:
                ckpt.atomic_save(self.state_dict(), self.checkpoint)
            if self._stop_training.is_set():  # Ctrl-C while chains train at once (threads or processes)
                raise KeyboardInterrupt
            return OUT_OF_TIME if self._deadline is not None and time.time() >= self._deadline else None

        def hook(step, info):  # given only with a hook_fn (the statistics are then read every iteration)
            if self.hook_fn is not None:
                self.hook_fn(chain, step, info)
        options = dict(generator=seeded_generator(self.target.device, self.chain_seeds[chain]),
                       hook_fn=None if self.hook_fn is None else hook, meter=CostMeter(self.target.evaluations_per_row, self.target.last_evaluations),
                       on_iteration=on_iteration, start=self.target.gaussian_start, standard=self.target.standard_coordinates,
                       disable_progbar=self.disable_progbar or not self._is_main, distributed=self.distributed,
                       desc=f"OSDS chain {chain}" if self.num_chains > 1 else "OSDS")
        # no effect handler here: chains may build in threads, and Pyro's handler stack is global (the callers
        # block the model's sites; the potential enters the model under its lock)
        if state is not None:
            sampler = restore_sampler(self._potential, self.target.init, self.config, state, **options)
        else:
            sampler = build_sampler(self._potential, self.target.init, self.config, **options)
        self._chains[chain] = sampler
        return sampler

    def _potential(self, z: torch.Tensor) -> torch.Tensor:
        """The target's batched potential, one thread at a time (its gradient flows outside the lock)."""
        with self._potential_lock:
            return self.target.potential(z)

    @property
    def _is_main(self) -> bool:
        """Whether this process prints and writes checkpoints (rank 0, or the only process)."""
        return self.distributed is None or self.distributed.is_main

    def _join(self, ctx: DistributedContext | None) -> None:
        """Trains and draws across ``ctx`` from now on, with chains built before too (from :meth:`load`)."""
        self.distributed = ctx
        for sampler in self.samplers:
            sampler.distributed = ctx

    # ------------------------------------------------------------------------------------------
    # drawing
    def sample(self, num_samples: int | None = None, num_steps: int | None = None, *, log_det: str | None = None
               ) -> OSDS:
        r"""
        Draws ``num_samples`` fresh weighted draws per chain with a ``num_steps``-step flow (any divisor of
        ``grid_size``; more, with ``target_se``: :mod:`pyro_osds.budget`) for :meth:`get_samples`, :meth:`log_evidence`
        and the rest, checks them once (:func:`~pyro_osds.checks.check_draws`) and warns about what it found.
        """
        self._require_fitted()
        ctx = distributed.current()
        if self.distributed is None and ctx is not None:  # e.g. a loaded sampler under torchrun
            self._join(ctx)
        num_samples = self.num_samples if num_samples is None else num_samples
        num_steps = self.num_steps if num_steps is None else num_steps
        check_positive_int("num_samples", num_samples)
        self.config.process.step_codes(num_steps)
        warn_untrained_step_count(self.samplers[0].trained_step_counts, num_steps)
        def draw(n):  # every chain's n draws, with the enumerated sites' draws
            with poutine.block(), out_of_memory_advice("drawing", self.config, self.checkpoint):
                draws = [s.draw_sharded(n, num_steps, log_det=log_det) for s in self.samplers]
                return self.target.add_discrete(draws, self.distributed)
        draws, budget, note = draw(num_samples), self.config.budget, None
        if budget.target_se is not None and all(d.weighted for d in draws):  # draw until log Z's SE is met
            deadline, self._deadline = self._deadline or budget.deadline(time.time()), None
            draws, note = draw_to_target(draws, draw, budget, deadline,
                                         diagnostic_references(self.samplers, draws, num_steps))
        self.draws, self.num_samples, self.num_steps = tuple(draws), num_samples, num_steps
        self._draw_report = check_draws(self.samplers, self.draws, num_steps, note)
        self._draw_report.warn(self.config.objective)
        return self

    # ------------------------------------------------------------------------------------------
    # persistence (:mod:`pyro_osds.checkpoint`)
    def state_dict(self) -> dict:
        """Everything :meth:`save` writes: tensors and plain Python values only."""
        self._require_fitted()
        return ckpt.runner_state(self)

    def save(self, path: str | os.PathLike) -> None:
        """Saves the trained samplers, their draws and the configuration (atomically: write, then rename).
        The file holds tensors and plain Python values only and loads with ``weights_only=True``."""
        ckpt.atomic_save(self.state_dict(), path)

    def load_state_dict(self, state: dict) -> None:
        """Restores the chains and draws of a :meth:`state_dict` after checking that they fit this runner
        (built with :meth:`setup`)."""
        ckpt.check_compatible(state, self)
        self.chain_seeds, self._chains = [int(s) for s in state["chain_seeds"]], {}
        with poutine.block():
            for chain, sampler_state in enumerate(state["samplers"]):
                self._new_chain(chain, sampler_state)
        self.draws = ckpt.restore_draws(state, self.target.device)

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
        return ckpt.load(cls, path, model, potential_fn, model_args=model_args, model_kwargs=model_kwargs, **kwargs)

    def __repr__(self) -> str:
        what = getattr(self.model, "__name__", "model") if self.model is not None else "potential_fn"
        status = "trained" if self.samplers else "not trained"
        return (f"OSDS({what}, num_chains={self.num_chains}, num_samples={self.num_samples}, "
                f"num_steps={self.num_steps}; {status})")
