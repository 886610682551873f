# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
The chain mapper: how the chains of a run train. One function trains one chain; :func:`map_chains` maps it over
the chains by one method and owns what differs between methods: Ctrl-C, the chains' warnings (raised again from
the user's call when a chain trained elsewhere), errors (the first chain's, once every chain has stopped) and the
advice an out-of-memory error gets (:func:`out_of_memory_advice`). :func:`choose_chain_method` picks the method.

==============  ======================================================================================
method          how
==============  ======================================================================================
``sequential``  one chain after the other, here
``threads``     at once, in threads: they share Python's interpreter lock and a Pyro model's (global)
                effect-handler stack, so they gain little on small models
``processes``   at once, each in a forked copy of this process (:mod:`pyro_osds.parallel`), which sends its
                chain's state back: shares neither (Linux; ``hook_fn`` cannot run there)
==============  ======================================================================================

Every chain has its own random stream, so every method gives the same chains, bit for bit. Across a process group
(:mod:`pyro_osds.distributed`) chains train in turn, each across the ranks.

Ctrl-C: a chain stops after its current iteration and keeps it; in threads and processes the other chains stop
too, chains not started yet never start, and the run keeps the chains trained so far.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable

import torch

from .parallel import can_fork, run_forked
from .util import check_choice, warn

__all__ = ["CHAIN_METHODS", "check_chain_method", "choose_chain_method", "map_chains", "out_of_memory_advice",
           "warn_interrupted"]

#: the reason a chain gives for stopping when the run's time limit (``max_time``) runs out
OUT_OF_TIME = "the run's time limit (`max_time`) ran out"

CHAIN_METHODS = ("auto", "sequential", "threads", "processes")


_NO_FORK = ("`chain_method='processes'` forks this process, which this platform cannot (no 'fork' start method) or "
            "must not (CUDA is initialised here: a forked copy can use neither CUDA nor autograd); use "
            "`chain_method='threads'` (or 'auto').")


def check_chain_method(chain_method: str, *, hook_fn: Callable | None = None, checkpoint=None) -> None:
    """Raises ``ValueError`` unless ``chain_method`` is one of :data:`CHAIN_METHODS` and can be used with a
    ``hook_fn`` and a ``checkpoint``."""
    check_choice("chain_method", chain_method, CHAIN_METHODS)
    if chain_method == "processes" and not can_fork():
        raise ValueError(_NO_FORK)
    if chain_method == "processes" and hook_fn is not None:
        raise ValueError("`hook_fn` cannot be called from chains training in processes (it would run in their "
                         "copies of this program); use `chain_method='threads'`.")
    if chain_method in ("threads", "processes") and checkpoint is not None:
        raise ValueError("A checkpoint holds every chain, so with `checkpoint` the chains train one after the "
                         f"other; use `chain_method='sequential'` (or 'auto'), not {chain_method!r}.")


def choose_chain_method(chain_method: str, num_chains: int, *, device: torch.device, checkpoint=None,
                        distributed=None, hook_fn: Callable | None = None) -> tuple[str, int]:
    """
    The method and the number of chains at once (``(method, num_workers)``) for ``chain_method``: as asked,
    except across a process group (chains in turn) or with a single chain; ``"auto"`` trains the chains one after
    the other with a ``checkpoint``, off the CPU, across a process group or on a single core, else as many at once
    as the cores allow at torch's thread count, in processes on Linux when torch uses one thread and no
    ``hook_fn`` is given (outside a daemonic process, which may not have children), else in threads.
    """
    if num_chains == 1 or chain_method == "sequential" or distributed is not None:
        return "sequential", 1
    if chain_method == "processes" and not can_fork():  # CUDA initialised since the runner was made
        raise ValueError(_NO_FORK)
    if chain_method != "auto":
        return chain_method, num_chains
    if checkpoint is not None or device.type != "cpu":
        return "sequential", 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    num_workers = max(1, min(num_chains, cores // max(1, torch.get_num_threads())))
    if num_workers == 1:
        return "sequential", 1
    # not on macOS, where forking a process that has used system frameworks can crash it
    processes = (can_fork() and sys.platform.startswith("linux") and not multiprocessing.current_process().daemon
                 and hook_fn is None and torch.get_num_threads() == 1)
    return ("processes" if processes else "threads"), num_workers


@contextlib.contextmanager
def out_of_memory_advice(what: str, config, checkpoint=None):
    """Re-raises an out-of-memory error of ``what`` (e.g. ``"training"``) with what to change in ``config`` (an
    :class:`~pyro_osds.config.OSDSConfig`), and where training was checkpointed."""
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise torch.OutOfMemoryError(
            f"Out of accelerator memory while {what}. Reduce `batch_size` (now {config.objective.diffusion.batch_size})"
            f" or `chunk_size` (now {config.evaluation.chunk_size}), use fewer draws, or run on the CPU "
            "(`device='cpu'`). Training progress up to the last completed iteration is kept"
            + (f" and checkpointed in {checkpoint!r}." if checkpoint else ".")
        ) from err


def map_chains(train: Callable[[int], object], num_chains: int, method: str, *, num_workers: int = 1,
               stop: threading.Event | None = None, to_state: Callable[[object], object] | None = None,
               from_state: Callable[[int, object], object] | None = None) -> dict[int, object]:
    r"""
    Trains chains ``0 .. num_chains - 1`` by ``method`` (module docstring), ``num_workers`` at once.

    :param callable train: ``train(chain) -> trained``, where ``trained.interrupted`` says whether Ctrl-C stopped
        it (a chain keeps its last completed iteration); it should check ``stop`` between iterations.
    :param threading.Event stop: set on Ctrl-C and when a chain is interrupted or fails; chains not started by then
        do not start (cleared before and after).
    :param callable to_state: for ``"processes"``: what a chain's process sends back, ``to_state(trained)``
        (picklable); ``from_state(chain, state)`` rebuilds it here.
    :returns: ``{chain: trained}`` of the chains that finished, in chain order; the first failing chain's error is
        raised once every chain has stopped (their warnings raised first).
    """
    stop = threading.Event() if stop is None else stop
    stop.clear()
    try:
        if method == "sequential":
            outcomes = _in_turn(train, num_chains, stop)
        elif method == "threads":
            outcomes = _in_threads(train, num_chains, num_workers, stop)
        elif method == "processes":
            outcomes = _in_processes(train, num_chains, num_workers, stop, to_state, from_state)
        else:
            raise ValueError(f"Unknown chain method {method!r}; choose one of {CHAIN_METHODS[1:]}.")
    finally:
        stop.clear()
    errors = {chain: value for chain, (ok, value) in outcomes.items() if not ok}
    if errors:
        raise errors[min(errors)]
    return {chain: value for chain, (_, value) in sorted(outcomes.items())}


def _attempt(train: Callable[[int], object], chain: int, stop: threading.Event) -> tuple[bool, object]:
    """``(True, trained)`` or ``(False, error)``; an interrupted or failed chain sets ``stop``."""
    try:
        trained = train(chain)
    except BaseException as error:  # raised again once every chain has stopped, in chain order
        stop.set()
        return False, error
    if getattr(trained, "interrupted", False):  # a Ctrl-C in this chain stops them all
        stop.set()
    return True, trained


def _in_turn(train, num_chains: int, stop: threading.Event) -> dict[int, tuple[bool, object]]:
    outcomes = {}
    for chain in range(num_chains):
        if stop.is_set():
            break
        outcomes[chain] = _attempt(train, chain, stop)
    return outcomes


def _in_threads(train, num_chains: int, num_workers: int, stop: threading.Event) -> dict[int, tuple[bool, object]]:
    outcomes = {}

    def job(chain: int) -> None:
        if not stop.is_set():
            outcomes[chain] = _attempt(train, chain, stop)  # one key per thread: no lock needed

    with warnings.catch_warnings(record=True) as caught:  # every thread's, raised again from the user's call
        warnings.simplefilter("always")
        with concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="osds-chain") as pool:
            pending = {pool.submit(job, chain) for chain in range(num_chains)}
            while pending:
                try:
                    _, pending = concurrent.futures.wait(pending, timeout=0.2)
                except KeyboardInterrupt:  # Ctrl-C reaches the main thread: every chain stops
                    stop.set()
    for record in caught:
        warn(str(record.message), record.category)
    return outcomes


def _in_processes(train, num_chains: int, num_workers: int, stop: threading.Event, to_state, from_state
                  ) -> dict[int, tuple[bool, object]]:
    def job(chain: int):
        def run():  # in the chain's process
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trained = train(chain)
            return to_state(trained), [(str(w.message), w.category) for w in caught]
        return run

    outcomes = {}
    for chain, (status, value) in sorted(run_forked({c: job(c) for c in range(num_chains)}, num_workers,
                                                    stop).items()):
        if status != "ok":
            outcomes[chain] = (False, value)
            continue
        state, chain_warnings = value
        for message, category in chain_warnings:
            warn(message, category)
        outcomes[chain] = _attempt(lambda c, state=state: from_state(c, state), chain, threading.Event())
    return outcomes


def warn_interrupted(chains: list, num_chains: int) -> bool:
    """Whether training of the ``chains`` kept (a prefix of ``num_chains``) was interrupted, and if so a warning
    saying where, and how to go on."""
    timed_out = [chain for chain, trained in enumerate(chains) if getattr(trained, "out_of_time", False)]
    if timed_out:
        warn(f"Training stopped when {OUT_OF_TIME} (chains {timed_out} at iterations "
             f"{[chains[c].iteration for c in timed_out]}); the draws are weighted exactly all the same. Call "
             "`continue_training()` to train further.", RuntimeWarning)
    stopped = [chain for chain, trained in enumerate(chains) if trained.interrupted]
    if not stopped and len(chains) == num_chains:
        return False
    where = f" (chains {stopped} at iterations {[chains[c].iteration for c in stopped]})" if stopped else ""
    warn(f"Training was interrupted{where}; {len(chains)} of {num_chains} chains are kept (each trained up to its "
         "last completed iteration). Call `continue_training()` to finish.", RuntimeWarning)
    return True
