"""Serving: continuous batching as a pure engine step, and the OpenAI-compatible HTTP app
beside it (`pangu serve`; the app needs the `serve` extra)."""

from .engine import (
    Counters,
    EngineSettings,
    EngineState,
    QueueFullError,
    Running,
    cancel,
    engine_step,
    init_engine,
    submit,
)
from .prefix_cache import PrefixCache
from .request import Event, Request

__all__ = ["Counters", "EngineSettings", "EngineState", "Event", "PrefixCache", "QueueFullError", "Request",
           "Running", "cancel", "engine_step", "init_engine", "submit"]
