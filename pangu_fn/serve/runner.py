"""EngineRunner: the one thread that owns an engine state, steps it while there is work, and
hands each request's events to the asyncio queue of the HTTP handler waiting for them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import replace

from ..config import ModelConfig
from ..params import Params
from .engine import EngineState, cancel, engine_step, submit
from .request import Event, Request


class EngineRunner:
    """Thread-safe front of an engine: `add` queues a request (raising the engine's errors at
    once) and returns the asyncio.Queue its events arrive on; `cancel` drops one at the next
    step; `stop` ends the thread and finishes every request still known with finish_reason
    "shutdown". `on_step(state, events)` runs on the engine thread after every step."""

    def __init__(self, state: EngineState, params: Params, cfg: ModelConfig,
                 on_step: Callable[[EngineState, list[Event]], None] | None = None) -> None:
        self.state, self.params, self.cfg, self.on_step = state, params, cfg, on_step
        self._lock = threading.Condition()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending: list[Request] = []
        self._cancels: list[str] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="pangu-engine", daemon=True)
        self._thread.start()

    def add(self, request: Request, queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue `request` for the next step; its events go to `queue` (default a new one),
        returned. Call from an event loop. Raises the engine's QueueFullError / InputError at
        once (the step itself never sees a bad request)."""
        queue = asyncio.Queue() if queue is None else queue
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            submit(replace(self.state, waiting=self.state.waiting + tuple(self._pending)), request, self.cfg)
            self._pending.append(request)
            self._queues[request.id] = (asyncio.get_running_loop(), queue)
            self._lock.notify()
        return queue

    def cancel(self, request_id: str) -> None:
        """Drop `request_id` at the next step (its queue gets a "cancelled" event)."""
        with self._lock:
            if request_id in self._queues:
                self._cancels.append(request_id)
                self._lock.notify()

    def snapshot(self) -> EngineState:
        """The state after the last step (do not step it)."""
        with self._lock:
            return self.state

    def stop(self) -> None:
        """End the thread after its current step (waited for: a step always ends, and a thread
        torn down inside a torch call aborts the process); requests still known get a
        "shutdown" event."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()
        with self._lock:
            for rid in list(self._queues):
                self._deliver(Event(rid, None, finish_reason="shutdown"))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.state.idle and not self._pending and not self._cancels and not self._stopping:
                    self._lock.wait(1.0)
                if self._stopping:
                    return
                state, pending, cancels = self.state, self._pending, self._cancels
                self._pending, self._cancels = [], []
            for request in pending:
                state = submit(state, request, self.cfg)
            for rid in cancels:
                state = cancel(state, rid)
            self._publish(*engine_step(state, self.params, self.cfg))

    def _publish(self, state: EngineState, events: list[Event]) -> None:
        """Make `state` the runner's, hand out `events`, then call `on_step` (engine thread)."""
        with self._lock:
            self.state = state
            for ev in events:
                self._deliver(ev)
        if self.on_step is not None:
            self.on_step(state, events)

    def _deliver(self, ev: Event) -> None:
        target = self._queues.get(ev.id)
        if target is None:
            return
        if ev.finish_reason is not None:
            del self._queues[ev.id]
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, ev)
        except RuntimeError:  # the handler's loop is closed: nobody is waiting
            pass
