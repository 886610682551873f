# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.chains: the chain mapper gives every method the same results, stops, warnings and errors
(the runner's chains through it: tests/test_api.py)."""

import threading
import warnings

import pytest
import torch

from pyro_osds.chains import (
    check_chain_method,
    choose_chain_method,
    map_chains,
    out_of_memory_advice,
    warn_interrupted,
)
from pyro_osds.config import OSDSConfig
from pyro_osds.parallel import can_fork

METHODS = ["sequential", "threads"] + (["processes"] if can_fork() else [])


class Trained:
    """What a chain's training gives back: its result, and whether Ctrl-C stopped it."""

    def __init__(self, chain, interrupted=False, out_of_time=False):
        self.chain, self.interrupted, self.iteration = chain, interrupted, 3 if interrupted else 10
        self.out_of_time = out_of_time

    def state(self):
        return (self.chain, self.interrupted)


def _map(train, method, num_chains=3, stop=None):
    return map_chains(train, num_chains, method, num_workers=num_chains, stop=stop, to_state=Trained.state,
                      from_state=lambda chain, state: Trained(*state))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_every_chain_and_returns_them_in_order(method):
    out = _map(lambda chain: Trained(chain), method)
    assert list(out) == [0, 1, 2] and [t.chain for t in out.values()] == [0, 1, 2]


@pytest.mark.parametrize("method", METHODS)
def test_the_first_chains_error_is_raised_after_the_others_stopped(method):
    def train(chain):
        if chain >= 1:
            raise ValueError(f"chain {chain} failed")
        return Trained(chain)

    with pytest.raises(ValueError, match="chain 1 failed"):
        _map(train, method)


@pytest.mark.parametrize("method", METHODS)
def test_a_chains_warnings_are_raised_again_here(method):
    def train(chain):
        warnings.warn(f"from chain {chain}", RuntimeWarning, stacklevel=1)
        return Trained(chain)

    with pytest.warns(RuntimeWarning) as record:
        _map(train, method)
    assert sorted(str(w.message) for w in record) == ["from chain 0", "from chain 1", "from chain 2"]
    assert all(w.filename == __file__ for w in record)  # attributed to the caller's line


def test_an_interrupted_chain_stops_the_chains_not_started_yet():
    started = []

    def train(chain):
        started.append(chain)
        return Trained(chain, interrupted=chain == 0)

    stop = threading.Event()
    out = _map(train, "sequential", stop=stop)
    assert started == [0] and list(out) == [0] and not stop.is_set()  # cleared for the next run
    with pytest.warns(RuntimeWarning, match=r"interrupted \(chains \[0\] at iterations \[3\]\); 1 of 3 chains"):
        assert warn_interrupted(list(out.values()), 3)
    assert not warn_interrupted([Trained(0), Trained(1)], 2)
    with pytest.warns(RuntimeWarning, match=r"time limit \(`max_time`\) ran out \(chains \[1\]"):
        assert not warn_interrupted([Trained(0), Trained(1, out_of_time=True)], 2)  # not interrupted: said apart


def test_a_stop_set_by_one_thread_is_seen_by_the_others():
    stop, chain_1_runs = threading.Event(), threading.Event()

    def train(chain):
        if chain == 0:
            assert chain_1_runs.wait(timeout=30)
            return Trained(0, interrupted=True)  # Ctrl-C in chain 0 sets the stop event ...
        chain_1_runs.set()
        return Trained(chain, interrupted=stop.wait(timeout=30))  # ... which the others check between iterations

    out = map_chains(train, 2, "threads", num_workers=2, stop=stop)
    assert [t.interrupted for t in out.values()] == [True, True]


def test_bad_methods_and_combinations_are_refused():
    with pytest.raises(ValueError, match="chain_method"):
        check_chain_method("vectorised")
    with pytest.raises(ValueError, match="with `checkpoint`"):
        check_chain_method("processes", checkpoint="run.pt")
    with pytest.raises(ValueError, match="Unknown chain method"):
        map_chains(lambda chain: Trained(chain), 2, "auto")


def test_no_chain_forks_a_process_that_has_initialised_cuda(monkeypatch):
    # on a GPU machine, CPU chains after a GPU run: a forked copy could use neither CUDA nor autograd (seen on an
    # H100: "Unable to handle autograd's threading in combination with fork-based multiprocessing")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not can_fork()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert choose_chain_method("auto", 2, device=cpu) == ("threads", 2)
    with pytest.raises(ValueError, match="CUDA is initialised"):
        check_chain_method("processes")
    with pytest.raises(ValueError, match="CUDA is initialised"):
        choose_chain_method("processes", 2, device=cpu)


def test_out_of_memory_errors_say_what_to_change():
    config = OSDSConfig(batch_size=512, chunk_size=1024)
    with pytest.raises(torch.OutOfMemoryError, match=r"`batch_size` \(now 512\).*`chunk_size` \(now 1024\).*run.pt"):
        with out_of_memory_advice("training", config, "run.pt"):
            raise torch.OutOfMemoryError("CUDA out of memory")
