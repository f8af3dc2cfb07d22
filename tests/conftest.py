"""Test-wide settings."""
import os

import pytest
import torch

# pytest-xdist runs one worker per core: more torch threads per worker only oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture()
def one_thread():
    """One intra-op thread for a test (modules opt in with `pytestmark`): fast on a shared 2-core
    machine, and the same in the subprocesses those tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
