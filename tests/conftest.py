"""Fixtures; the helper functions live in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import FAMILIES, random_model

# One busy thread per core: under `pytest -n N` each worker, and through OMP_NUM_THREADS every
# process it starts, gets cpu_count // N torch threads (at most 2). Two workers of two threads on
# two cores spin-wait on each other: a demo-model decode took over 10x the CPU time that way.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Tests run and leave THREADS torch threads (an in-process `pangu bench` or `pangu demo`
    sets its own `--threads`)."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """(params, cfg) of a random tiny model of each family, biases and norms redrawn."""
    return random_model(request.param)
