"""Shared test configuration: GPU tests skip cleanly where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# pytest-xdist workers share the machine's cores: torch's default (one thread per core in
# every worker) oversubscribes them by the worker count and stalls the CPU model
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
