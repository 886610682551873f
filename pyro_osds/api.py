# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The public runner :class:`OSDS`: a drop-in replacement for ``MCMC(NUTS(model)).run(...)`` that
returns posterior draws *and* the model's log evidence. It composes a target adapter
(:mod:`pyro_osds.model`, :mod:`pyro_osds.target`) and one :class:`~pyro_osds.sampler.FlowSampler` per
chain; summaries live in :mod:`pyro_osds.diagnostics`, persistence in :mod:`pyro_osds.checkpoint`,
ArviZ output in :mod:`pyro_osds.convert`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.importance import LogWeightsMixin
from pyro.poutine.uncondition_messenger import UnconditionMessenger

from . import checkpoint as ckpt
from . import distributed
from .config import OSDSConfig
from .diagnostics import diagnostics, print_summary, select_indices, weighted_summary
from .distributed import DistributedContext, broadcast_object
from .model import ModelTarget, build_target
from .ops.estimators import K_HAT_THRESHOLD
from .parallel import can_fork, run_forked
from .results import Draws, LogEvidence, UnreliableEvidenceWarning
from .sampler import FlowSampler, MixtureSampler, build_sampler, restore_sampler
from .target import FlatTarget
from .util import check_positive_int, derive_seed, seeded_generator, warn

__all__ = ["OSDS", "LogEvidence"]


class _UnconditionSites(UnconditionMessenger):
    """:class:`~pyro.poutine.uncondition_messenger.UnconditionMessenger` for the named sites only (not for the
    ``pyro.deterministic`` sites, which Pyro also records as observed)."""

    def __init__(self, sites):
        super().__init__()
        self.sites = frozenset(sites)

    def _pyro_sample(self, msg):
        if msg["name"] in self.sites:
            super()._pyro_sample(msg)


class OSDS(LogWeightsMixin):
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
    same mode), which is what the importance weights (ESS, k-hat, per-chain log Z) are for. The
    importance weights of the pooled draws are Pyro's :class:`~pyro.infer.importance.LogWeightsMixin`
    (``get_log_normalizer``, ``get_ESS``, ``get_normalized_weights``).

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
    :param int chain_threads: chains trained at once (default: as many as the chains and the CPU cores allow, a
        core per chain at torch's thread count; ``1``: one after the other). Each chain has its own random stream,
        so the result is the same either way. With ``checkpoint`` set, on a GPU or across a process group, the
        chains train one after the other.
    :param bool chain_processes: whether chains trained at once run in forked processes (:mod:`pyro_osds.parallel`)
        rather than threads. Default ``None``: processes on Linux (which forks safely) when torch uses one thread and no
        ``hook_fn`` is given (a hook would run in the chain's process), else threads. Threads share Python's
        interpreter lock and evaluate a model's potential one at a time (Pyro's effect handlers are global), so on
        small models they gain little; processes share neither.
    :param callable hook_fn: ``hook_fn(chain, step, info)`` after every training iteration (from the chain's
        thread when chains train at once).
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
                 device: str | torch.device | None = None, chain_threads: int | None = None,
                 chain_processes: bool | None = None, hook_fn: Callable | None = None,
                 disable_progbar: bool = False, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 100, resume: bool = False, **options):
        if (model is None) == (potential_fn is None):
            raise ValueError("Only one of `model` or `potential_fn` must be specified.")
        if model is not None and not callable(model):
            raise TypeError(f"`model` must be a callable Pyro model, got {type(model).__name__}.")
        if potential_fn is not None and initial_params is None:
            raise ValueError("`initial_params` must be provided with `potential_fn`, e.g. "
                             "`initial_params={'x': torch.zeros(3)}` (as for Pyro's HMC/NUTS).")
        for name, value in (("num_samples", num_samples), ("num_chains", num_chains),
                            ("checkpoint_every", checkpoint_every)):
            check_positive_int(name, value)
        if chain_threads is not None:
            check_positive_int("chain_threads", chain_threads)
        if chain_processes and not can_fork():
            raise ValueError("`chain_processes=True` needs the 'fork' start method, which this platform lacks; leave "
                             "`chain_processes` unset (chains then train in threads).")
        if chain_processes and hook_fn is not None:
            raise ValueError("`hook_fn` cannot be called from chains training in processes (it would run in their "
                             "copies of this program); pass `chain_processes=False` to train them in threads.")
        if num_steps is not None:
            check_positive_int("num_steps", num_steps)
        if resume and checkpoint is None:
            raise ValueError("`resume=True` needs `checkpoint=<path>` (the file to resume from and write to).")
        self.config = OSDSConfig.resolve(preset=preset, config=config, method=method, **options)
        if num_steps is None:
            num_steps = self.config.process.grid_size if self.config.method == "dis" else 1
        self.config.process.step_codes(num_steps)
        self.model, self.potential_fn, self.initial_params = model, potential_fn, initial_params
        self.num_samples, self.num_chains = num_samples, num_chains
        #: the step count of the current draws; ``train_num_steps``: the one the chains are trained for
        self.num_steps = self.train_num_steps = num_steps
        self.transforms, self.batched_potential = transforms, batched_potential
        self.max_plate_nesting, self.init_strategy = max_plate_nesting, init_strategy
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device={device!r}` was asked for but CUDA is not available here; use `device='cpu'` "
                             "(or leave `device` unset to follow the data).")
        self.hook_fn, self.disable_progbar = hook_fn, disable_progbar
        self.chain_threads, self.chain_processes = chain_threads, chain_processes
        # one chain at a time in the model's potential (Pyro's effect-handler stack is global); set to stop
        # chains training in other threads
        self._potential_lock, self._stop_training = threading.RLock(), threading.Event()
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.chain_seeds: list[int] = []
        #: the process group training and drawing are shared over (set by :meth:`fit`; ``None``: one process)
        self.distributed: DistributedContext | None = None
        self.target: FlatTarget | None = None
        self.samplers: list[FlowSampler | MixtureSampler] = []
        #: the current draws, one :class:`~pyro_osds.results.Draws` per chain (empty before :meth:`sample`)
        self.draws: tuple[Draws, ...] = ()
        # (the draws, per chain the found modes they lost): the check inverts the map at every found mode, so it
        # runs once per set of draws, not at every log_evidence()
        self._lost_modes: tuple[tuple[Draws, ...], list[list[int]]] | None = None
        self.model_args, self.model_kwargs = (), {}
        self.interrupted = False

    @property
    def kind(self) -> str:
        """``"model"`` or ``"potential"``: what this runner samples."""
        return "model" if self.model is not None else "potential"

    # ------------------------------------------------------------------------------------------
    # training
    def setup(self, *args, **kwargs) -> OSDS:
        """Builds the flat target of the model called with these arguments (:meth:`fit` does this first)."""
        with poutine.block():
            self.target, self.model_args, self.model_kwargs = build_target(
                self.model, self.potential_fn, args, kwargs, initial_params=self.initial_params,
                transforms=self.transforms, batched_potential=self.batched_potential,
                max_plate_nesting=self.max_plate_nesting, init_strategy=self.init_strategy, device=self.device)
        return self

    def _new_sampler(self, chain: int, state: dict | None = None) -> FlowSampler | MixtureSampler:
        """Chain ``chain``: built afresh (its own mode search decides between one flow and a mixture with a
        component per mode, :func:`~pyro_osds.sampler.build_sampler`) or restored from ``state``."""
        def hook(step, info, chain=chain):
            if self.hook_fn is not None:
                self.hook_fn(chain, step, info)
            if self.checkpoint is not None and step % self.checkpoint_every == 0 and self._is_main:
                ckpt.atomic_save(self.state_dict(), self.checkpoint)
            if self._stop_training.is_set():  # Ctrl-C while chains train at once (threads or processes)
                raise KeyboardInterrupt

        options = dict(num_steps=self.train_num_steps, generator=seeded_generator(self.target.device,
                                                                                  self.chain_seeds[chain]),
                       hook_fn=hook, disable_progbar=self.disable_progbar or not self._is_main,
                       desc=f"OSDS chain {chain}" if self.num_chains > 1 else "OSDS", distributed=self.distributed)
        # no effect handler here: chains may build in threads, and Pyro's handler stack is global (the callers
        # block the model's sites; the potential enters the model under its lock)
        if state is not None:
            return restore_sampler(self._potential, self.target.init, self.config, state, **options)
        return build_sampler(self._potential, self.target.init, self.config, **options)

    def _potential(self, z: torch.Tensor) -> torch.Tensor:
        """The target's batched potential, one thread at a time (its gradient flows outside the lock)."""
        with self._potential_lock:
            return self.target.potential(z)

    def fit(self, *args, **kwargs) -> OSDS:
        r"""
        Trains ``num_chains`` independent samplers on the model's potential (model arguments are
        passed through as to ``MCMC.run``). Returns ``self``.

        With ``checkpoint`` set, progress is saved periodically; with ``resume=True`` an existing
        checkpoint is continued. ``KeyboardInterrupt`` stops training and keeps the last completed
        iteration of every chain started so far (with a warning); call :meth:`continue_training`
        to go on.
        """
        self.setup(*args, **kwargs)
        self.distributed = self._process_group()
        with poutine.block():
            self.samplers, self.draws = [], ()
            if self.resume and os.path.exists(self.checkpoint):
                self.load_state_dict(ckpt.read(self.checkpoint))
            else:
                # one seed per chain, drawn up front from the global RNG (pyro.set_rng_seed):
                # independent streams, and a resumed run can recreate the chains it had not started
                self.chain_seeds = [derive_seed() for _ in range(self.num_chains)]
                if self.distributed is not None:  # rank 0's seeds: every rank trains the same chains
                    self.chain_seeds = broadcast_object(self.chain_seeds, self.distributed)
            self._train_chains()
        return self

    def _process_group(self) -> DistributedContext | None:
        """The initialised process group to train and draw across (:mod:`pyro_osds.distributed`), checked against
        the configuration; ``None`` in one process."""
        ctx = distributed.current()
        if ctx is None:
            return None
        config = self.config
        if config.method != "osds" or config.objective.diffusion.weight > 0 or config.objective.flow_kl.weight <= 0:
            raise ValueError(
                f"Training across a process group ({ctx.world_size} ranks) supports the one-step objective (the "
                f"default, method='osds' with `diffusion_weight=0`); got method={config.method!r} with "
                f"`diffusion_weight`={config.objective.diffusion.weight}. Use the default objective, or run one "
                "process per model.")
        return ctx

    @property
    def _is_main(self) -> bool:
        """Whether this process prints and writes checkpoints (rank 0, or the only process)."""
        return self.distributed is None or self.distributed.is_main

    def continue_training(self, num_iterations: int | None = None) -> OSDS:
        r"""
        Continues training every chain up to ``num_iterations`` iterations in total (default: the
        configured ``num_iterations``), e.g. after an interruption or on a sampler from
        :meth:`load`. Chains not started yet are trained from scratch. Returns ``self``; call
        :meth:`sample` for fresh draws.
        """
        self._require_fitted()
        if num_iterations is not None:
            check_positive_int("num_iterations", num_iterations)
            self.config = self.config.replace(num_iterations=num_iterations)
        self._attach_process_group(self._process_group())
        with poutine.block():
            self._train_chains()
        return self

    def _attach_process_group(self, ctx: DistributedContext | None) -> None:
        """Trains and draws across ``ctx`` from now on, also with chains built before it was known (a sampler from
        :meth:`load` in a script launched by ``torchrun``)."""
        self.distributed = ctx
        for sampler in self.samplers:
            sampler.distributed = ctx  # and its components' and trainers'

    def _num_chain_threads(self) -> int:
        if self.checkpoint is not None or self.target.device.type != "cpu" or self.distributed is not None:
            return 1
        if self.chain_threads is not None:
            return min(self.chain_threads, self.num_chains)
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, min(self.num_chains, cores // max(1, torch.get_num_threads())))

    def _trains_in_processes(self) -> bool:
        """Whether chains trained at once run in processes (``chain_processes``)."""
        if self.chain_processes is not None:
            return self.chain_processes
        # not by default on macOS, where forking a process that has used system frameworks can crash it, nor in a
        # daemonic process (a multiprocessing pool's worker), which may not have children
        return (can_fork() and sys.platform.startswith("linux") and not multiprocessing.current_process().daemon
                and self.hook_fn is None and torch.get_num_threads() == 1)

    def _train_chains(self) -> None:
        self.interrupted = False
        num_threads = self._num_chain_threads()
        if num_threads > 1 and self._trains_in_processes():
            return self._train_chains_in_processes(num_threads)
        if num_threads > 1:
            return self._train_chains_concurrently(num_threads)
        for chain in range(self.num_chains):
            if chain < len(self.samplers):
                sampler = self.samplers[chain]
            else:
                sampler = self._new_sampler(chain)
                self.samplers.append(sampler)
            with self._explain_out_of_memory("training"):
                sampler.fit(until=self.config.optim.num_iterations)
            if self.checkpoint is not None and self._is_main:
                ckpt.atomic_save(self.state_dict(), self.checkpoint)
            if sampler.interrupted:
                self.interrupted = True
                warn(f"Training was interrupted in chain {chain} at iteration {sampler.iteration}; "
                     f"{len(self.samplers)} of {self.num_chains} chains are kept (the last one partially trained). "
                     "Call `continue_training()` to finish.", RuntimeWarning)
                break

    def _train_chains_in_processes(self, num_processes: int) -> None:
        """Trains the chains in ``num_processes`` forked processes at a time (:func:`~pyro_osds.parallel.run_forked`;
        the same result as one after the other): each trains its copy of the chain and sends back its state, from
        which the chain is rebuilt here, and the warnings it raised. Ctrl-C stops every chain after its current
        iteration."""
        self._stop_training.clear()

        def job(chain: int):
            def train():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    sampler = self.samplers[chain] if chain < len(self.samplers) else self._new_sampler(chain)
                    sampler.fit(until=self.config.optim.num_iterations)
                return sampler.state_dict(), [(str(w.message), w.category) for w in caught]
            return train

        outcomes = run_forked({chain: job(chain) for chain in range(self.num_chains)}, num_processes,
                              self._stop_training)
        self._stop_training.clear()
        samplers: dict[int, FlowSampler | MixtureSampler] = dict(enumerate(self.samplers))
        errors: dict[int, BaseException] = {}
        for chain in sorted(outcomes):
            status, value = outcomes[chain]
            if status != "ok":
                errors[chain] = value
                continue
            state, chain_warnings = value
            for message, category in chain_warnings:
                warn(message, category)
            samplers[chain] = self._new_sampler(chain, state)
        self._keep_started_chains(samplers, errors)

    def _train_chains_concurrently(self, num_threads: int) -> None:
        """Trains the chains in ``num_threads`` threads (:meth:`_train_chains` one after the other gives the same
        result); Ctrl-C stops every chain after its current iteration."""
        samplers: dict[int, FlowSampler | MixtureSampler] = dict(enumerate(self.samplers))
        errors: dict[int, BaseException] = {}
        self._stop_training.clear()

        def train(chain: int) -> None:
            try:
                if self._stop_training.is_set():
                    return
                if chain not in samplers:
                    samplers[chain] = self._new_sampler(chain)  # one key per thread: no lock needed
                with self._explain_out_of_memory("training"):
                    samplers[chain].fit(until=self.config.optim.num_iterations)
                if samplers[chain].interrupted:  # a KeyboardInterrupt in this chain stops them all
                    self._stop_training.set()
            except BaseException as error:  # re-raised in the main thread, in chain order
                self._stop_training.set()
                errors[chain] = error

        # the chains' warnings are recorded (from every thread) and raised again here, from the user's call
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="osds-chain") as pool:
                futures = [pool.submit(train, chain) for chain in range(self.num_chains)]
                pending = set(futures)
                while pending:
                    try:
                        _, pending = concurrent.futures.wait(pending, timeout=0.2)
                    except KeyboardInterrupt:
                        self._stop_training.set()
        self._stop_training.clear()
        for record in caught:
            warn(str(record.message), record.category)
        self._keep_started_chains(samplers, errors)

    def _keep_started_chains(self, samplers: dict, errors: dict) -> None:
        """After chains trained at once: keeps chains ``0..k-1`` of ``samplers`` (``{chain: sampler}``), raises the
        first chain's error, else warns when training was interrupted."""
        started = sorted(samplers)
        kept = [chain for i, chain in enumerate(started) if chain == i]  # chains 0..k-1 (a prefix: resume needs it)
        self.samplers = [samplers[chain] for chain in kept]
        if errors:
            raise errors[min(errors)]
        stopped = [chain for chain in kept if samplers[chain].interrupted]
        if stopped or len(kept) < self.num_chains:
            self.interrupted = True
            warn(f"Training was interrupted (chains {stopped} at iterations "
                 f"{[samplers[c].iteration for c in stopped]}); {len(kept)} of {self.num_chains} chains are kept. "
                 "Call `continue_training()` to finish.", RuntimeWarning)

    def run(self, *args, **kwargs) -> OSDS:
        """Trains (:meth:`fit`) and draws ``num_samples`` per chain (:meth:`sample`). Returns ``self``."""
        return self.fit(*args, **kwargs).sample()

    @contextlib.contextmanager
    def _explain_out_of_memory(self, what: str):
        try:
            yield
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"Out of accelerator memory while {what}. Reduce `batch_size` (now "
                f"{self.config.objective.diffusion.batch_size}) or `chunk_size` (now "
                f"{self.config.evaluation.chunk_size}), use fewer draws, or run on the CPU (`device='cpu'`). Training "
                "progress up to the last completed iteration is kept"
                + (f" and checkpointed in {self.checkpoint!r}." if self.checkpoint else ".")
            ) from err

    def _require_fitted(self):
        if not self.samplers:
            raise RuntimeError("Call `run(...)` (or `fit(...)`) first.")

    # ------------------------------------------------------------------------------------------
    # drawing
    def sample(self, num_samples: int | None = None, num_steps: int | None = None, *, log_det: str | None = None
               ) -> OSDS:
        r"""
        Draws ``num_samples`` fresh weighted draws per chain from the trained samplers with a
        ``num_steps``-step flow (any divisor of ``grid_size``), replacing the stored draws that
        :meth:`get_samples`, :meth:`log_evidence` and :meth:`to_inference_data` use. Returns ``self``.
        """
        self._require_fitted()
        ctx = distributed.current()
        if self.distributed is None and ctx is not None:  # e.g. a loaded sampler under torchrun
            self._attach_process_group(ctx)
        num_samples = self.num_samples if num_samples is None else num_samples
        num_steps = self.num_steps if num_steps is None else num_steps
        check_positive_int("num_samples", num_samples)
        self.config.process.step_codes(num_steps)
        trained = self.samplers[0].trained_step_counts
        if trained is not None and num_steps not in trained:
            warn(f"The {num_steps}-step flow was not trained (trained step counts: {trained}); its draws are still "
                 "weighted exactly, but expect a poor ESS or folds. Train it with "
                 f"`OSDS(..., num_steps={num_steps})` or `flow_kl_steps=(..., {num_steps})`, or use the paper's "
                 "objective (`preset='paper-cpu'`), which trains every step size.")
        with poutine.block(), self._explain_out_of_memory("drawing"):
            draws = [s.draw_sharded(num_samples, num_steps, log_det=log_det) for s in self.samplers]
            if isinstance(self.target, ModelTarget) and self.target.enumerated_sites:
                discrete = self.target.sample_discrete(torch.cat([d.x for d in draws])) if self._is_main else None
                if self.distributed is not None:
                    discrete = broadcast_object(discrete, self.distributed)
                draws = [d._replace(discrete={k: v[i * num_samples:(i + 1) * num_samples] for k, v in discrete.items()})
                         for i, d in enumerate(draws)]
        self.draws, self.num_samples, self.num_steps = tuple(draws), num_samples, num_steps
        lost = []
        for i, (sampler, d) in enumerate(zip(self.samplers, self.draws, strict=True)):
            lost.append(sampler.warn_lost_modes(d, label=f"Chain {i}: ", num_steps=num_steps))
            if d.num_folded:
                warn(f"Chain {i}: the {num_steps}-step flow folds (its Jacobian changes orientation) at "
                     f"{d.num_folded} of {num_samples} draws, so their importance weights are not exact. "
                     "Train longer or use more steps.", RuntimeWarning)
        self._lost_modes = (self.draws, lost)
        if not self._weighted:
            return self
        evidence = self.log_evidence()
        pooled = evidence.pooled
        if not pooled.tail_ok:
            chains = ", ".join(f"chain {i} {c.k_hat:.2f}" for i, c in enumerate(evidence.chains))
            warn(f"The importance weights have a heavy tail: Pareto k-hat {pooled.k_hat:.2f} > {K_HAT_THRESHOLD} "
                 f"({chains}; ESS/N {pooled.ess_per_draw:.2f}), so the variance of the weights is infinite and log Z's "
                 "standard error understates its error (log Z tends to come out low). Train longer "
                 "(`num_iterations`, or `continue_training()`), or check log Z with more draws or an independent "
                 "method before comparing models.", UnreliableEvidenceWarning)
        return self

    # ------------------------------------------------------------------------------------------
    # results
    def _require_draws(self):
        self._require_fitted()
        if not self.draws:
            raise RuntimeError("No draws yet: call `sample()` (or `run(...)`).")

    @property
    def log_weights(self) -> torch.Tensor:
        """The float64 log-weights of the pooled draws, in the order of :meth:`get_samples`."""
        self._require_draws()
        return torch.cat([d.log_weight for d in self.draws])

    @property
    def _weighted(self) -> bool:
        """Whether the current draws carry importance weights (not multi-step CDDS draws, or ``log_det='none'``)."""
        return all(d.log_det != "none" for d in self.draws)

    def resample_generator(self) -> torch.Generator:
        """The random stream of the default resampling: seeded from the current draws' log-weights, so the
        same draws always resample the same way (:meth:`get_samples`, :meth:`to_inference_data` and a reloaded
        sampler agree) and new draws (:meth:`sample`) resample afresh."""
        self._require_draws()
        digest = hashlib.sha256(self.log_weights.detach().cpu().numpy().tobytes()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def draw_indices(self, num_samples: int | None = None, group_by_chain: bool = False, *,
                     resample: bool = True) -> torch.Tensor:
        """Indices into the pooled draws (chain-major) that :meth:`get_samples` returns, ``(chains, M)`` with
        ``group_by_chain`` else ``(1, M)`` (:func:`~pyro_osds.diagnostics.select_indices`)."""
        self._require_draws()
        resample = resample and self._weighted
        log_w = self.log_weights.reshape(len(self.draws), -1)
        return select_indices(log_w, num_samples=num_samples, group_by_chain=group_by_chain, resample=resample,
                              generator=self.resample_generator() if resample else None)

    def get_samples(self, num_samples: int | None = None, group_by_chain: bool = False, *, resample: bool = True,
                    unconstrained: bool = False) -> dict[str, torch.Tensor]:
        r"""
        Posterior draws in constrained space (sites in sorted order), shaped ``(chains * draws, *site_shape)``
        or ``(chains, draws, *site_shape)`` with ``group_by_chain``, as :meth:`pyro.infer.MCMC.get_samples`.

        By default the draws are **equally weighted**: the sampler's draws resampled in proportion to their
        importance weights (systematic resampling, :func:`~pyro_osds.diagnostics.resample_indices`; per chain
        when grouped, over the pooled draws otherwise), so that plain averages, quantiles and plots of them
        are posterior estimates. Their effective size is the weights' Kish ESS (:meth:`get_ESS`), not the
        count; a warning says when it is below a tenth of the draws. The same draws always resample the same
        way (:meth:`resample_generator`). Draws without importance weights (multi-step CDDS draws, or
        ``sample(log_det='none')``) are returned as they are.

        With ``resample=False`` the raw draws of the sampler :math:`q` come back, in the order of
        :attr:`log_weights` (:meth:`get_normalized_weights`): weight them yourself.

        :param int num_samples: that many *distinct* positions of the draws, picked at random (per chain
            when grouped); :meth:`pyro.infer.MCMC.get_samples` draws with replacement.
        :param bool group_by_chain: keep the chain dimension.
        :param bool resample: equally weighted draws (default) or the raw weighted ones.
        :param bool unconstrained: values in the unconstrained space the sampler works in.
        """
        self._require_draws()
        idx = self.draw_indices(num_samples, group_by_chain, resample=resample)
        z = torch.cat([d.x for d in self.draws])[idx.to(self.draws[0].x.device)]  # (C or 1, M, D)
        lead = tuple(idx.shape) if group_by_chain else (idx.numel(),)
        flat = z.reshape(-1, z.shape[-1])
        values = self.target.unpack(flat) if unconstrained else self.target.constrain(flat)
        out = OrderedDict((name, values[name].reshape(lead + tuple(values[name].shape[1:])).detach())
                          for name in sorted(values))
        for name in self.draws[0].discrete or {}:
            v = torch.cat([d.discrete[name] for d in self.draws])[idx.to(self.draws[0].discrete[name].device)]
            out[name] = v.reshape(lead + tuple(v.shape[2:]))
        return out

    def predictive(self, *args, return_sites: list[str] | None = None, parallel: bool = False, **kwargs
                   ) -> dict[str, torch.Tensor]:
        r"""
        Posterior predictive draws: the model run once at each posterior draw with
        :class:`pyro.infer.Predictive`, its observed sites sampled (as :func:`pyro.poutine.uncondition` does), so
        they are replicated data :math:`\tilde y \sim p(\tilde y \mid y)`. The posterior draws are those of
        :meth:`get_samples` ``(group_by_chain=True)`` (equally weighted, resampled per chain), flattened
        chain-major: pass the result to :meth:`to_inference_data` (``posterior_predictive=``) and its draws line
        up with the ``posterior`` group's.

        :param args: the model's arguments (default: those of :meth:`run`; give new covariates to predict
            at them).
        :param list return_sites: the sites to return (default: the observed sites).
        :param bool parallel: run the model once, vectorised over the draws (needs a model written with
            plates), instead of once per draw.
        :param kwargs: the model's keyword arguments (default: those of :meth:`run`).
        :returns: ``{site: (chains * draws, *shape)}``.
        """
        self._require_draws()
        if self.model is None:
            raise ValueError("`predictive()` needs a Pyro model; this OSDS samples a potential.")
        if not args and not kwargs:
            args, kwargs = self.model_args, self.model_kwargs
        samples = self.get_samples(group_by_chain=True)
        samples = {name: v.reshape((-1,) + tuple(v.shape[2:])) for name, v in samples.items()}
        sites = list(self.target.observed_sites) if return_sites is None else list(return_sites)
        if not sites:
            raise ValueError("The model has no observed sites to predict; name the sites with `return_sites`.")
        model = _UnconditionSites(self.target.observed_sites)(self.model)
        predictive = Predictive(model, posterior_samples=samples, return_sites=sites, parallel=parallel)
        with poutine.block(), self._potential_lock:
            return {name: v.detach() for name, v in predictive(*args, **kwargs).items()}

    def log_evidence(self) -> LogEvidence:
        r"""Log evidence :math:`\log\hat Z` with standard error, ELBO, ESS and k-hat, pooled and per chain."""
        self._require_draws()
        mixtures = [(torch.stack([c for c, _ in s.modes]), s.weights.tolist()) if isinstance(s, MixtureSampler)
                    else None for s in self.samplers]
        if self._lost_modes is None or self._lost_modes[0] is not self.draws:  # draws restored from a file
            self._lost_modes = (self.draws, [s.lost_modes(d, self.num_steps)
                                             for s, d in zip(self.samplers, self.draws, strict=True)])
        lost = sum(len(chain) for chain in self._lost_modes[1])
        return LogEvidence.from_draws(self.draws, self.num_steps, mixtures=mixtures, num_lost_modes=lost,
                                      too_many_modes=any(s.too_many_modes for s in self.samplers))

    def diagnostics(self) -> dict:
        """
        Per-site ``n_eff`` (Kish ESS of the weights) and ``r_hat`` (split-R-hat between independently
        trained chains), plus per-chain evidence diagnostics (:func:`pyro_osds.diagnostics.diagnostics`).
        """
        return diagnostics(self.get_samples(group_by_chain=True, resample=False), float(self.get_ESS()), self.log_evidence(),
                           [s.num_skipped for s in self.samplers])

    def summary_dict(self, prob: float = 0.9) -> dict:
        """Importance-weighted posterior summary per site (the numbers :meth:`summary` prints)."""
        self._require_draws()
        return weighted_summary(self.get_samples(group_by_chain=True, resample=False), self.log_weights, prob)

    def summary(self, prob: float = 0.9) -> None:
        """
        Prints Pyro's summary table with importance-weighted statistics (``n_eff`` = Kish ESS of the
        weights, ``r_hat`` between chains), followed by the evidence lines.
        """
        print_summary(self.summary_dict(prob), self.log_evidence())

    def plot_training(self, **kwargs):
        """Loss, ELBO and ESS/N of the training draws over the iterations, per chain
        (:func:`pyro_osds.plots.plot_training`; keywords ``panels``, ``smooth``, ``axes``). Returns the axes."""
        from .plots import plot_training

        return plot_training(self, **kwargs)

    def plot_weights(self, **kwargs):
        """Histogram of the draws' log importance weights per chain, titled with k-hat and ESS/N
        (:func:`pyro_osds.plots.plot_weights`; keywords ``bins``, ``axes``). Returns the axes."""
        from .plots import plot_weights

        return plot_weights(self, **kwargs)

    def to_datatree(self, **kwargs):
        """The results as an :class:`xarray.DataTree` (ArviZ >= 1 data model); see :func:`pyro_osds.convert.to_datatree`."""
        from .convert import to_datatree

        return to_datatree(self, **kwargs)

    def to_inference_data(self, **kwargs):
        """
        The results as ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ >= 1); see
        :func:`pyro_osds.convert.to_inference_data` (keywords ``resample``, ``log_likelihood``, ``coords``,
        ``dims``).
        """
        from .convert import to_inference_data

        return to_inference_data(self, **kwargs)

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
        self.chain_seeds = [int(s) for s in state["chain_seeds"]]
        self.samplers = []
        with poutine.block():
            for chain, sampler_state in enumerate(state["samplers"]):
                self.samplers.append(self._new_sampler(chain, sampler_state))
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
