"""Test-wide settings."""
import os

import torch

# pytest-xdist runs one worker per core: more torch threads per worker only oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
