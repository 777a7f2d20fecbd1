"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import EngineState
from .request import Event

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Gauges of the engine (running, waiting, slots in use), counters (prompt and generated
    tokens, prefix-cache hits and cached tokens, drafted and accepted tokens, requests by finish
    reason) and histograms (time to first token, inter-token latency, end-to-end latency), all
    prefixed `pangu_`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.running = Gauge("pangu_requests_running", "requests in a slot", registry=r)
        self.waiting = Gauge("pangu_requests_waiting", "requests in the queue", registry=r)
        self.slots = Gauge("pangu_slots_in_use", "KV-cache slots in use", registry=r)
        self.slots_total = Gauge("pangu_slots_total", "KV-cache slots", registry=r)
        self.prompt_tokens = Counter("pangu_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("pangu_generation_tokens", "tokens generated", registry=r)
        self.draft_tokens = Counter("pangu_spec_draft_tokens", "drafted tokens verified", registry=r)
        self.accepted_tokens = Counter("pangu_spec_accepted_tokens", "drafted tokens accepted", registry=r)
        self.prefix_hits = Counter("pangu_prefix_cache_hits", "requests that reused a cached prefix", registry=r)
        self.prefix_tokens = Counter("pangu_prefix_cache_tokens", "prompt positions taken from the prefix cache",
                                     registry=r)
        self.finished = Counter("pangu_requests_finished", "finished requests", ["reason"], registry=r)
        self.ttft = Histogram("pangu_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pangu_inter_token_latency_seconds", "between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pangu_e2e_request_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._seen = None

    def engine(self, state: EngineState, events: Sequence[Event] = ()) -> None:
        """Update the gauges and counters from the engine's state (counters by difference) and
        a step's events (finish reasons)."""
        for ev in events:
            if ev.finish_reason is not None:
                self.finished.labels(ev.finish_reason).inc()
        self.running.set(state.running)
        self.waiting.set(len(state.waiting))
        self.slots.set(state.running)
        self.slots_total.set(state.settings.max_batch)
        c, seen = state.counters, self._seen
        self.prompt_tokens.inc(c.prompt_tokens - (seen.prompt_tokens if seen else 0))
        self.generated_tokens.inc(c.generated_tokens - (seen.generated_tokens if seen else 0))
        self.prefix_tokens.inc(c.cached_tokens - (seen.cached_tokens if seen else 0))
        self.draft_tokens.inc(c.draft_tokens - (seen.draft_tokens if seen else 0))
        self.accepted_tokens.inc(c.accepted_tokens - (seen.accepted_tokens if seen else 0))
        hits = state.prefix.hits if state.prefix else 0
        self.prefix_hits.inc(hits - (self._hits if seen else 0))
        self._seen, self._hits = c, hits

    def text(self) -> bytes:
        return generate_latest(self.registry)
