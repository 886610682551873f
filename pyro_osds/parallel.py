# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Jobs run at once in forked processes: how :class:`~pyro_osds.OSDS` trains its chains in parallel on a CPU.

Threads share one interpreter lock, and a Pyro model's potential one effect-handler stack (so one chain at a
time may evaluate it): on small models two chains in two threads gain little over one after the other. A forked
process per chain shares neither. A fork copies
the parent's memory, so a job may be any closure (a Pyro model defined in a notebook need not be picklable); only
its result travels back, pickled through a pipe. Like ``pyro.infer.MCMC``'s parallel chains, this needs the
``fork`` start method (Linux, macOS with care; not Windows).

Ctrl-C: neither side raises ``KeyboardInterrupt`` while the jobs run. In a child, SIGINT (from the terminal, which
signals the whole process group, or forwarded by the parent) sets the child's copy of the ``stop`` event, which the
job checks between iterations, so that every job still returns its last completed state; the parent, on SIGINT,
sets its ``stop`` (no new job starts) and forwards the signal to the running children.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import traceback
import warnings
from collections.abc import Callable, Hashable

__all__ = ["can_fork", "run_forked"]


def can_fork() -> bool:
    """Whether jobs can run in forked copies of this process (the jobs are closures, copied, never pickled): the
    platform has the 'fork' start method and this process has not initialised CUDA, after which a forked copy can use
    neither CUDA nor, once autograd ran on the GPU, autograd
    (https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork)."""
    import torch

    return "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()


def _prepare_fork() -> None:
    """Imports the forked jobs would each do on their own: ``torch.optim``'s optimisers import ``torch._dynamo``
    on first use (0.7 s on a 2-core CPU), which the parent, which rebuilds the results, needs anyway."""
    import torch._dynamo  # noqa: F401


def _child(job: Callable[[], object], conn, stop: threading.Event) -> None:
    """A forked process: runs ``job`` and sends ``("ok", result)`` or ``("error", exception)`` back."""
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        outcome = ("ok", job())
    except BaseException as error:  # sent to the parent, which raises it
        outcome = ("error", error)
    try:
        payload = pickle.dumps(outcome)
    except Exception as cannot:  # an exception (or result) that does not pickle: its text at least
        text = "".join(traceback.format_exception(outcome[1])) if outcome[0] == "error" else repr(cannot)
        payload = pickle.dumps(("error", RuntimeError(f"A forked job failed:\n{text}")))
    conn.send_bytes(payload)
    conn.close()


def run_forked(jobs: dict[Hashable, Callable[[], object]], num_workers: int, stop: threading.Event
               ) -> dict[Hashable, tuple[str, object]]:
    r"""
    Runs every job of ``jobs`` (in their order) in its own forked process, at most ``num_workers`` at a time.

    :param dict jobs: ``key -> job``; a job takes no arguments and returns a picklable result.
    :param int num_workers: processes at once.
    :param threading.Event stop: set on Ctrl-C (in the children: their copies, which the jobs should check between
        steps; in the parent: no job starts after it is set).
    :returns: ``key -> ("ok", result)`` or ``("error", exception)`` for every job that ran; jobs that never started
        (after a Ctrl-C) are missing. A process that dies without a result (e.g. killed for memory) gives a
        ``RuntimeError`` naming its exit code.
    """
    _prepare_fork()
    context = multiprocessing.get_context("fork")
    waiting, running, results = list(jobs), {}, {}

    def interrupt(*_):  # Ctrl-C in the parent: no new job, and the running ones stop after their current step
        stop.set()
        for _, process in list(running.values()):
            try:
                os.kill(process.pid, signal.SIGINT)
            except (ProcessLookupError, TypeError):  # finished already, or not started
                pass

    # the parent turns SIGINT into `interrupt` while the jobs run (a KeyboardInterrupt raised between two lines
    # here could lose the results); one that ignores SIGINT keeps ignoring it, and off the main thread (where
    # no handler can be set) a KeyboardInterrupt taken while waiting does the same
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):
            previous = None
        else:
            signal.signal(signal.SIGINT, interrupt)
    try:
        while waiting or running:
            while waiting and len(running) < num_workers and not stop.is_set():
                key = waiting.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(jobs[key], sender, stop), daemon=True,
                                          name=f"pyro_osds-{key}")
                with warnings.catch_warnings():
                    # Python >= 3.12 warns about forking a process with threads (a notebook's, a progress bar's):
                    # a child could inherit a lock another thread held; the jobs take none of those threads' locks
                    warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                    process.start()
                sender.close()
                running[receiver] = (key, process)
            if not running:
                break
            try:
                ready = multiprocessing.connection.wait(list(running), timeout=0.2)
            except KeyboardInterrupt:
                interrupt()
                continue
            for receiver in ready:
                key, process = running.pop(receiver)
                try:
                    results[key] = pickle.loads(receiver.recv_bytes())
                except EOFError:
                    process.join()
                    results[key] = ("error", RuntimeError(
                        f"The process of {key!r} exited (code {process.exitcode}) without a result: killed, e.g. for "
                        "lack of memory, or crashed in native code."))
                receiver.close()
                process.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for receiver, (_, process) in running.items():  # an error in the parent itself: no orphans
            process.kill()
            process.join()
            receiver.close()
    return results
