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


# -- scheduling under `pytest -n N` ------------------------------------------------------------
# Files whose tests share a module fixture of minutes (the demo model's full held-out scores, the
# quantization-quality Hessians): each goes whole to one worker.
ONE_WORKER_FILES = ("test_demo_model.py", "test_quant_demo.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: takes ten seconds or more of CPU; scheduled first under -n")


def pytest_collection_modifyitems(config, items):
    """Heavy tests first (a stable sort), so that xdist's workers finish at about the same time."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """For plain `-n N` (xdist's `load`): the ONE_WORKER_FILES first, each whole to one worker,
    then every other test on its own, in collection order (heavy first), each to the next worker
    that has two or fewer queued."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduler(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if path.rsplit("/", 1)[-1] in ONE_WORKER_FILES else nodeid

    return Scheduler(config, log)
