# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.parallel: jobs in forked processes (results, errors, dead processes, Ctrl-C)."""

import os
import signal
import threading
import time

import pytest
import torch

from pyro_osds.parallel import can_fork, run_forked

pytestmark = pytest.mark.skipif(not can_fork(), reason="needs the 'fork' start method")


def test_jobs_return_their_results_and_see_the_parents_memory():
    data = torch.arange(6.0)  # not passed: the forked child has it

    def job(k):
        return lambda: {"k": k, "sum": data[k:].sum(), "pid": os.getpid()}

    results = run_forked({k: job(k) for k in range(4)}, 2, threading.Event())
    assert sorted(results) == [0, 1, 2, 3]
    for k, (status, value) in results.items():
        assert status == "ok" and value["k"] == k and torch.equal(value["sum"], data[k:].sum())
        assert value["pid"] != os.getpid()
    assert len({value["pid"] for _, value in results.values()}) == 4  # a process per job


def test_errors_come_back_as_exceptions_and_a_dead_process_is_named():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def raises():
        raise ValueError("bad job")

    def raises_unpicklable():
        raise Unpicklable("local class")

    results = run_forked({"ok": lambda: 1, "error": raises, "odd": raises_unpicklable, "dead": lambda: os._exit(3)},
                         4, threading.Event())
    assert results["ok"] == ("ok", 1)
    assert results["error"][0] == "error" and isinstance(results["error"][1], ValueError)
    assert results["odd"][0] == "error" and "local class" in str(results["odd"][1])
    assert results["dead"][0] == "error" and "exited (code 3) without a result" in str(results["dead"][1])


def test_ctrl_c_stops_the_running_jobs_after_their_current_step_and_starts_no_more():
    stop = threading.Event()
    started = threading.Event()

    def job(k):
        def run():  # steps until its copy of `stop` is set by SIGINT, then returns how far it got
            for step in range(100_000):
                if stop.is_set():
                    return step
                time.sleep(0.01)
            return None
        return run

    def ctrl_c():  # what a terminal's Ctrl-C does to the parent, once the jobs run
        started.wait(30)
        time.sleep(1.0)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # see test_api's Ctrl-C test
    sender = threading.Thread(target=ctrl_c)
    sender.start()
    try:
        started.set()
        results = run_forked({k: job(k) for k in range(3)}, 2, stop)
    finally:
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert stop.is_set() and signal.getsignal(signal.SIGINT) is previous
    assert sorted(results) == [0, 1]  # the third never started
    assert all(status == "ok" and isinstance(step, int) and step > 0 for status, step in results.values())
