"""Where a tensor-parallel step's time goes: wall time spent inside the eager collectives.

    with collective_time() as spent:
        pf.generate(params, cfg, prompts, 32)
    spent.seconds, spent.count   # waiting for peers included: the collective's whole latency

`pangu bench --tp` reports it per decoded token beside the step time (docs/distributed.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class CollectiveTime:
    """Seconds spent in `count` eager collectives."""

    seconds: float = 0.0
    count: int = 0


_active: list[CollectiveTime] = []


@contextmanager
def collective_time() -> Iterator[CollectiveTime]:
    """Accumulate the wall time and number of the eager collectives this process runs inside."""
    spent = CollectiveTime()
    _active.append(spent)
    try:
        yield spent
    finally:
        _active.remove(spent)


def record(start: float) -> None:
    """Add one collective that began at `start` (time.perf_counter()) to every active clock."""
    if _active:
        elapsed = time.perf_counter() - start
        for spent in _active:
            spent.seconds += elapsed
            spent.count += 1


def all_reduce_latency(numel: int, dtype: torch.dtype, repeats: int = 200) -> float:
    """Median seconds of one eager all-reduce of `numel` values over the default group, the way
    the parallel leaves sum (`leaves.all_reduce`; every rank must call it; after 20 unmeasured
    rounds)."""
    from .leaves import all_reduce

    x = torch.zeros(numel, dtype=dtype)
    times = []
    for i in range(20 + repeats):
        start = time.perf_counter()
        all_reduce(x, None)
        if i >= 20:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
