"""Starting N local ranks, the way torchrun does, and never leaving one behind.

The parent holds the rendezvous store (a TCPStore on a free port of 127.0.0.1) and starts the
workers with torchrun's environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`, the agent-store flag), so `group.init` joins the same way under both. It then
watches them: when one exits non-zero, the others get `GRACE_S` to fail on their own (a dead
peer breaks their next collective), are then terminated, and `RankFailed` names the first rank
that failed. Each rank's own error goes to stderr.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import PanguError
from .group import DEFAULT_TIMEOUT_S, destroy, device_type, init

GRACE_S = 5.0
POLL_S = 0.05


class RankFailed(PanguError, RuntimeError):
    """A worker process of a tensor-parallel run exited non-zero (its error is on stderr);
    `exit_codes` holds every rank's (negative: stopped by that signal)."""

    def __init__(self, message: str, exit_codes: list[int]) -> None:
        super().__init__(message)
        self.exit_codes = exit_codes


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun's variables for local rank `rank`, with the parent's store at `port`."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True"}


def _store(timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def default_threads(device: str, world_size: int) -> int | None:
    """CPU threads per rank: the cores shared out (None: leave torch's default off the CPU)."""
    return max(1, (os.cpu_count() or 1) // world_size) if device_type(device) == "cpu" else None


def launch(fn: Callable[..., Any], world_size: int, *args: Any, device: str = "cpu",
           threads: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` new processes (spawned: `fn` must be a
    module-level function), each already joined to the default process group of `device`'s
    backend with collective timeout `timeout_s`; returns each rank's return value, in rank
    order. `threads` CPU threads per rank (default: the cores shared out). Raises RankFailed
    when a rank fails; every process has stopped by then."""
    ctx = mp.get_context("spawn")
    store = _store(timeout_s)
    results = ctx.Queue()
    threads = threads if threads is not None else default_threads(device, world_size)
    procs = [ctx.Process(target=_worker, args=(fn, rank, world_size, args, rank_env(rank, world_size, store.port),
                                                device, threads, timeout_s, results), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    raised: dict[int, float] = {}  # rank -> when it raised: the first is the cause, the rest followed

    def drain() -> None:
        try:
            while True:
                rank, ok, value = results.get_nowait()
                (out if ok else raised)[rank] = value
        except queue.Empty:
            pass

    failed = supervise(procs, lambda p: p.exitcode, drain)
    drain()
    if failed is not None:
        first = min(raised, key=raised.__getitem__) if raised else failed[0]
        codes = [p.exitcode for p in procs]
        raise RankFailed(f"tensor-parallel rank {first} of {world_size} failed (exit codes {codes}); "
                         "its error is above on stderr", codes)
    while len(out) < world_size:  # results put just before exiting may still be in the pipe
        rank, _, value = results.get(timeout=timeout_s)
        out[rank] = value
    return [out[r] for r in range(world_size)]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, args: Sequence[Any], env: dict[str, str],
            device: str, threads: int | None, timeout_s: float, results: Any) -> None:
    os.environ.update(env)
    if threads:
        torch.set_num_threads(threads)
    init(device, timeout_s)
    try:
        value = fn(rank, world_size, *args)
    except BaseException:
        results.put((rank, False, time.time()))
        raise
    finally:
        destroy()
    results.put((rank, True, value))


def run_processes(command: Sequence[str], world_size: int, env: dict[str, str] | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Run `command` as `world_size` local ranks (torchrun's environment plus `env`), rank
    0's stdout passed through and the others' dropped; returns 0, or the first failing rank's
    exit code (1 for a rank ended by a signal) after stopping the rest and saying which on stderr."""
    store = _store(timeout_s)
    procs = [subprocess.Popen(list(command), env={**os.environ, **(env or {}), **rank_env(r, world_size, store.port)},
                              stdout=None if r == 0 else subprocess.DEVNULL, start_new_session=True)
             for r in range(world_size)]  # own sessions: a signal to our group reaches rank 0 once, from us
    with _signals_to(procs[0]):
        failed = supervise(procs, lambda p: p.poll(), lambda: None)
    if failed is None:
        return 0
    print(f"tensor-parallel rank {failed[0]} of {world_size} exited with code {failed[1]} (its error, if it "
          "printed one, is above); the other ranks were stopped", file=sys.stderr, flush=True)
    return failed[1] if 0 < failed[1] < 256 else 1


@contextlib.contextmanager
def _signals_to(lead: subprocess.Popen) -> Iterator[None]:
    """While inside: SIGINT and SIGTERM of this process go to rank 0 alone, which ends the run
    (a server stops its followers; elsewhere the others fail on their next collective and
    `supervise` stops them). The ranks run in sessions of their own, so Ctrl-C or a signal to
    our process group reaches rank 0 once, through here. Only in the main thread, where Python
    takes signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def forward(sig: int, _frame: Any) -> None:
        lead.send_signal(sig)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """In a rank started by `run_processes`: get SIGTERM when the launching process dies, even
    by SIGKILL (Linux; elsewhere nothing), so no rank outlives it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(procs: list[Any], exit_code: Callable[[Any], int | None],
              tick: Callable[[], None]) -> tuple[int, int] | None:
    """Wait for every process; None when all exit 0, else `(rank, code)` of the first that
    failed, after giving the rest `GRACE_S` and then terminating (finally killing) them."""
    failed: tuple[int, int] | None = None
    deadline = None
    while True:
        tick()
        codes = [exit_code(p) for p in procs]
        if failed is None:
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None:
                deadline = time.monotonic() + GRACE_S
        if all(c is not None for c in codes):
            return failed
        if deadline is not None and time.monotonic() > deadline:
            _stop([p for p, c in zip(procs, codes) if c is None], exit_code)
            return failed
        time.sleep(POLL_S)


def _stop(procs: list[Any], exit_code: Callable[[Any], int | None]) -> None:
    for p in procs:
        p.terminate()
    end = time.monotonic() + GRACE_S
    while time.monotonic() < end and any(exit_code(p) is None for p in procs):
        time.sleep(POLL_S)
    for p in procs:
        if exit_code(p) is None:
            p.kill()
    for p in procs:
        p.join() if hasattr(p, "join") else p.wait()
