# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
import os

import pyro
import pytest
import torch

# Two-thread torch stalls badly on a shared 2-core machine; tests always use one thread.
torch.set_num_threads(1)
os.environ.setdefault("CI", "1")  # no progress bars in tests


@pytest.fixture(autouse=True)
def seeded_rng():
    """Every test starts from the same RNG state and leaves the global state as it found it."""
    with torch.random.fork_rng():
        pyro.set_rng_seed(0)
        pyro.clear_param_store()
        yield


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)
