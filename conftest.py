"""Pytest configuration, also for doctests: one thread per parallel worker."""

import os

import torch

if "PYTEST_XDIST_WORKER" in os.environ:
    # Parallel workers already use every core; more threads would oversubscribe them.
    torch.set_num_threads(1)
