"""Serving a tensor-parallel model: one engine, mirrored on every rank.

Every rank holds the same engine state (slots, queue, prefix cache, generators) over its own
part of the model and of the KV cache (its heads). Rank 0 runs the HTTP app and an
`EngineRunner` whose loop, before each step, broadcasts what the step starts from: the
requests submitted and cancelled since the last one and rank 0's clock (`time.monotonic()`,
which decides queue timeouts). The other ranks `follow`: they apply the same submissions and
cancellations and call the same `engine_step` with the same clock, so every rank makes the
same forward calls (whose collectives meet), the same prefix-cache copies and the same
sampling draws; only rank 0 delivers events. Steps are deterministic given these inputs, so
nothing else crosses between ranks.

While idle, rank 0 sends a heartbeat every `HEARTBEAT_S` (the followers' receive would
otherwise hit the group's collective timeout); `stop` sends a stop message. Messages are JSON
in a uint8 tensor broadcast from rank 0: one broadcast of `CHUNK` bytes (length first), a
second one only for a longer message. A collective that fails on rank 0 (a follower died, or
stopped answering within the group timeout) ends the process with exit code 1 and the error
on stderr, so the launcher stops the server instead of leaving it up without an engine.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..params import Params
from ..sampling import SamplingParams
from .engine import EngineState, cancel, engine_step, submit
from .request import Event, Request
from .runner import EngineRunner

HEARTBEAT_S = 1.0
CHUNK = 8192
HEADER = 8  # the message length, little-endian, in the first bytes of the first chunk


@dataclass(frozen=True)
class StepMessage:
    """What rank 0 tells the followers before a step: the requests submitted and the ids
    cancelled since the last message, rank 0's clock, whether to step (False: a heartbeat)
    and whether to stop."""

    requests: tuple[Request, ...] = ()
    cancels: tuple[str, ...] = ()
    now: float = 0.0
    step: bool = False
    stop: bool = False


def encode(msg: StepMessage) -> bytes:
    """The message as JSON bytes (no pickle between ranks)."""
    return json.dumps({"requests": [_request_json(r) for r in msg.requests], "cancels": list(msg.cancels),
                       "now": msg.now, "step": msg.step, "stop": msg.stop}).encode()


def decode(data: bytes) -> StepMessage:
    d = json.loads(data)
    return StepMessage(tuple(_request_from_json(r) for r in d["requests"]), tuple(d["cancels"]), d["now"],
                       d["step"], d["stop"])


def _request_json(r: Request) -> dict[str, Any]:
    out = {f.name: getattr(r, f.name) for f in fields(Request)}
    out.update(prompt=list(r.prompt), sampling=asdict(r.sampling), stop=list(r.stop), eos=sorted(r.eos))
    return out


def _request_from_json(d: dict[str, Any]) -> Request:
    return Request(**{**d, "prompt": tuple(d["prompt"]), "sampling": SamplingParams(**d["sampling"]),
                      "stop": tuple(d["stop"]), "eos": frozenset(d["eos"])})


class Channel:
    """Rank 0 -> every rank messages over the default process group (or `group`)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def send(self, msg: StepMessage) -> None:
        """Rank 0: broadcast `msg`."""
        data = encode(msg)
        first = torch.zeros(CHUNK, dtype=torch.uint8)
        first[:HEADER] = torch.frombuffer(bytearray(len(data).to_bytes(HEADER, "little")), dtype=torch.uint8)
        head = data[:CHUNK - HEADER]
        if head:
            first[HEADER:HEADER + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(first, 0, group=self.group)
        if len(data) > len(head):
            dist.broadcast(torch.frombuffer(bytearray(data[len(head):]), dtype=torch.uint8), 0, group=self.group)

    def receive(self) -> StepMessage:
        """Ranks > 0: the next message from rank 0 (raises after the group's timeout)."""
        first = torch.empty(CHUNK, dtype=torch.uint8)
        dist.broadcast(first, 0, group=self.group)
        n = int.from_bytes(first[:HEADER].numpy().tobytes(), "little")
        data = first[HEADER:HEADER + min(n, CHUNK - HEADER)].numpy().tobytes()
        if n > len(data):
            rest = torch.empty(n - len(data), dtype=torch.uint8)
            dist.broadcast(rest, 0, group=self.group)
            data += rest.numpy().tobytes()
        return decode(data)


def apply(state: EngineState, params: Params, cfg: ModelConfig,
          msg: StepMessage) -> tuple[EngineState, list[Event]]:
    """What every rank does with a message: submit, cancel, then step if asked (donates `state`)."""
    for request in msg.requests:
        state = submit(state, request, cfg)
    for rid in msg.cancels:
        state = cancel(state, rid)
    if not msg.step:
        return state, []
    return engine_step(state, params, cfg, msg.now)


def follow(state: EngineState, params: Params, cfg: ModelConfig, channel: Channel | None = None) -> EngineState:
    """Ranks > 0: mirror rank 0's engine until it sends stop; returns the last state. Raises
    the collective's error when rank 0 stops sending (dead, or silent past the timeout)."""
    channel = channel or Channel()
    while True:
        msg = channel.receive()
        if msg.stop:
            return state
        state, _ = apply(state, params, cfg, msg)


class MirroredRunner(EngineRunner):
    """Rank 0's EngineRunner: each step's inputs go to the followers first (see the module
    docstring). `on_failure(error)` runs when a collective fails (default: print it and end
    the process with exit code 1)."""

    def __init__(self, state: EngineState, params: Params, cfg: ModelConfig,
                 on_step: Callable[[EngineState, list[Event]], None] | None = None,
                 channel: Channel | None = None, on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.channel = channel or Channel()
        self.on_failure = on_failure or _exit_on_failure
        super().__init__(state, params, cfg, on_step)

    def _loop(self) -> None:
        try:
            self._mirror()
        except BaseException as e:  # noqa: BLE001 (the engine is gone: say why and stop serving)
            self.on_failure(e)

    def _mirror(self) -> None:
        while True:
            with self._lock:
                if self.state.idle and not self._pending and not self._cancels and not self._stopping:
                    self._lock.wait(HEARTBEAT_S)
                stopping, state = self._stopping, self.state
                pending, cancels = tuple(self._pending), tuple(self._cancels)
                self._pending, self._cancels = [], []
            step = not stopping and bool(pending or cancels or not state.idle)
            msg = StepMessage(pending, cancels, time.monotonic(), step, stopping)
            self.channel.send(msg)
            if stopping:
                return
            if not step:
                continue
            self._publish(*apply(state, self.params, self.cfg, msg))


def _exit_on_failure(error: BaseException) -> None:
    print(f"pangu serve (rank 0): the tensor-parallel engine failed: {type(error).__name__}: {error}",
          file=sys.stderr, flush=True)
    os._exit(1)


def leave_signals_to_rank_0() -> None:
    """Ranks > 0 ignore SIGINT and SIGTERM (Ctrl-C, `kill` of the process group, a service
    manager stopping them all): rank 0 ends open streams and then stops them with a stop
    message, so they exit 0 after it; the supervisor's SIGKILL still ends a stuck one."""
    import signal

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def follow_served(served: Any, options: Any) -> EngineState:
    """A rank > 0 of `pangu serve --tp N`: the engine `create_app` builds on rank 0 (same
    settings, detokenizer, seed and drafter: `served` is this rank's `Served`, `options` the
    `ServerOptions`), mirrored until rank 0 stops."""
    from .engine import init_engine

    leave_signals_to_rank_0()
    tok = served.tokenizer
    state = init_engine(served.params, served.cfg, options.settings, tok.decode if tok is not None else None,
                        options.seed, served.drafter, served.draft_k)
    return follow(state, served.params, served.cfg)
