"""Continuous batching as a pure step: `engine_step(state, params, cfg) -> (state, events)`.

The state is a value: a fixed set of KV-cache slots (one `KVCache` of `max_batch` rows plus
two padding rows), the running requests (slot, tokens so far, own generator, text released),
the waiting queue, the prefix cache and the counters. A step admits waiting requests into free
slots, runs **one** `forward` call over the running rows (decode rows feed their last token,
prefilling rows up to `prefill_chunk` prompt tokens), samples each row that caught up with its
tokens, applies the stop rules, frees finished slots and returns the step's events. The state
passed in is donated: its cache buffers, generators and prefix cache are reused by the state
returned, so only the returned state may be used afterwards.

Batch invariance (`invariant=True`, the default): every call computes each row the same way
whatever else runs, so that in fp32 on the CPU a request's tokens do not depend on the batch.
Each call feeds at least `MIN_WIDTH` positions per row (torch's CPU attention takes another
kernel below 4 queries), covers at least `MIN_ROWS` rows (below 9 our linear takes its split-K
path, and torch's CPU matrix product computes the last rows of 9-11 another way), and attends over all `max_len` positions (padding row 0 sits at
`max_len - T`, padding row 1 at 0, so the key length and the masked kernel never change).
The cost: a step computes `max(rows, 12) x max(T, 4)` positions; with `invariant=False` decode
steps feed one position per running row.

Speculative decoding (`init_engine(..., drafter=...)`, see `drafting`): each decoding row feeds
its last token and up to k drafts in the same call, keeps the accepted ones plus the target's
next token, and its cache length rolls back by the engine's bookkeeping (`computed`). A
draft model's cache lives in the state beside the target's, one row per slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..cache import KVCache, init_cache
from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..params import Params
from .batch import MIN_ROWS, MIN_WIDTH, PAD_ROWS, Feed, call_rows
from .drafting import Draft, draft_computed, make_draft, propose, verify
from .prefix_cache import PrefixCache
from .request import Event, Request
from .sampler import sample_row, token_logprobs
from .text import Detokenize, TextState, ids_text, release


class QueueFullError(InputError):
    """The waiting queue holds `max_queue` requests already."""


@dataclass(frozen=True)
class EngineSettings:
    """`max_batch` slots of `max_len` positions (default: the context length, less 2 in
    invariant mode); `prefill_chunk` prompt tokens a row prefills per step at most;
    `max_queue` waiting requests at most; `prefix_cache` positions the prefix cache holds
    (0: off); `invariant` batch-invariant steps (see the module docstring)."""

    max_batch: int = 16
    max_len: int | None = None
    prefill_chunk: int = 256
    max_queue: int = 256
    prefix_cache: int = 0
    invariant: bool = True

    def check(self, cfg: ModelConfig) -> None:
        if self.max_batch < 1 or self.prefill_chunk < 1 or self.max_queue < 0 or self.prefix_cache < 0:
            raise ConfigError(f"engine: expected max_batch >= 1, prefill_chunk >= 1, max_queue >= 0 and "
                              f"prefix_cache >= 0, found {self.max_batch}, {self.prefill_chunk}, "
                              f"{self.max_queue}, {self.prefix_cache}")
        if self.max_len is not None and not 2 <= self.max_len <= self.limit(cfg):
            raise ConfigError(f"engine: expected 2 <= max_len <= {self.limit(cfg)} (context {cfg.max_seq_len}"
                              f"{', less 2 for batch-invariant steps' if self.invariant else ''}), found {self.max_len}")

    def limit(self, cfg: ModelConfig) -> int:
        """The most positions a request may use: prompt + max_tokens."""
        return cfg.max_seq_len - (MIN_WIDTH - 2 if self.invariant else 0)

    def request_limit(self, cfg: ModelConfig) -> int:
        return self.max_len or self.limit(cfg)


@dataclass(frozen=True)
class Counters:
    """Totals since the engine started (`draft_tokens` drafts verified, `accepted_tokens` of
    them kept)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    timed_out: int = 0
    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class Running:
    """A request in slot `slot`: `tokens` prompt + generated so far, `computed` of them in
    the cache, its own `generator`, how much text it released, `cached` prompt positions
    taken from the prefix cache, and `draft_computed` of its tokens in the draft model's cache."""

    request: Request
    slot: int
    tokens: tuple[int, ...]
    computed: int
    generator: torch.Generator
    text: TextState = TextState()  # noqa: RUF009 (frozen)
    cached: int = 0
    draft_computed: int = 0

    @property
    def generated(self) -> tuple[int, ...]:
        return self.tokens[len(self.request.prompt):]


@dataclass(frozen=True)
class EngineState:
    settings: EngineSettings
    cache: KVCache
    slots: tuple[Running | None, ...]
    waiting: tuple[Request, ...]
    cancelled: frozenset[str]
    prefix: PrefixCache | None
    detokenize: Detokenize
    seeds: torch.Generator
    counters: Counters = Counters()
    draft: Draft | None = None

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running


def init_engine(params: Params, cfg: ModelConfig, settings: EngineSettings = EngineSettings(),
                detokenize: Detokenize | None = None, seed: int = 0, drafter: Any = None, k: int = 4,
                draft_dtype: Any = None) -> EngineState:
    """An engine with empty slots on the params' device. `detokenize` turns generated ids
    into text (None: `ids_text`); `seed` seeds the seeds of requests that bring none;
    `drafter` (None: none) drafts `k` tokens per decoding row and step: a `--draft` spec
    ("lookup", "self", a model folder loaded in `draft_dtype`, default the target's dtype,
    "lookup+" before one) or a drafter object of `pangu_fn.speculative`. Raises ConfigError
    for bad settings or a drafter that does not fit the model."""
    settings.check(cfg)
    rows = max(settings.max_batch + PAD_ROWS, MIN_ROWS)
    cache = init_cache(params, cfg, rows, cfg.max_seq_len)
    draft = None if drafter is None else make_draft(drafter, params, cfg, rows, k, draft_dtype)
    return EngineState(settings, cache, (None,) * settings.max_batch, (), frozenset(),
                       PrefixCache(settings.prefix_cache) if settings.prefix_cache else None,
                       detokenize or ids_text, torch.Generator(device="cpu").manual_seed(seed), draft=draft)


def submit(state: EngineState, request: Request, cfg: ModelConfig) -> EngineState:
    """The state with `request` queued. Raises QueueFullError when `max_queue` requests wait,
    InputError when prompt + max_tokens exceed a slot or a token id is outside the vocabulary."""
    limit = state.settings.request_limit(cfg)
    n = len(request.prompt)
    if n + request.max_tokens > limit:
        raise InputError(f"request {request.id}: the prompt has {n} tokens and max_tokens is "
                         f"{request.max_tokens}: {n + request.max_tokens} positions, beyond the "
                         f"{limit} this server's context holds")
    bad = next((t for t in request.prompt if not 0 <= t < cfg.vocab_size), None)
    if bad is not None:
        raise InputError(f"request {request.id}: token id {bad} outside the vocabulary [0, {cfg.vocab_size})")
    if len(state.waiting) >= state.settings.max_queue:
        raise QueueFullError(f"the queue holds {len(state.waiting)} requests (max_queue "
                             f"{state.settings.max_queue}); retry later")
    return replace(state, waiting=(*state.waiting, request))


def cancel(state: EngineState, request_id: str) -> EngineState:
    """The state with `request_id` marked: the next step drops it (waiting or running), frees
    its slot and reports it with finish_reason "cancelled". Unknown ids are ignored."""
    return replace(state, cancelled=state.cancelled | {request_id})


def engine_step(state: EngineState, params: Params, cfg: ModelConfig,
                now: float | None = None) -> tuple[EngineState, list[Event]]:
    """One scheduling step (see the module docstring); `now` (time.monotonic()) decides which
    waiting requests passed their deadline. Donates `state`."""
    now = time.monotonic() if now is None else now
    events: list[Event] = []
    counters = state.counters
    slots = list(state.slots)
    for r in slots:
        if r is not None and r.request.id in state.cancelled:
            events.append(Event(r.request.id, None, finish_reason="cancelled"))
            slots[r.slot] = None
            counters = replace(counters, cancelled=counters.cancelled + 1)
    waiting = []
    for q in state.waiting:
        if q.id in state.cancelled:
            events.append(Event(q.id, None, finish_reason="cancelled"))
            counters = replace(counters, cancelled=counters.cancelled + 1)
        elif q.deadline is not None and now > q.deadline:
            events.append(Event(q.id, None, finish_reason="timeout"))
            counters = replace(counters, timed_out=counters.timed_out + 1)
        else:
            waiting.append(q)
    cache = state.cache
    for slot in range(len(slots)):
        if slots[slot] is None and waiting:
            slots[slot] = _admit(waiting.pop(0), slot, cache, state)
    state = replace(state, slots=tuple(slots), waiting=tuple(waiting), cancelled=frozenset(), counters=counters)
    if not state.running:
        return state, events
    state, step_events = _run(state, params, cfg)
    return state, events + step_events


def _admit(request: Request, slot: int, cache: KVCache, state: EngineState) -> Running:
    seed = request.seed if request.seed is not None else int(torch.randint(2**62, (1,), generator=state.seeds))
    generator = torch.Generator(device=cache.lengths.device).manual_seed(seed)
    key, cached = state.prefix.match(request.prompt) if state.prefix else (None, 0)
    if key is not None:
        state.prefix.restore(key, cached, cache, PAD_ROWS + slot)
    return Running(request, slot, request.prompt, cached, generator, cached=cached)


def _run(state: EngineState, params: Params, cfg: ModelConfig) -> tuple[EngineState, list[Event]]:
    """Drafting (with a drafter), the forward call over the running rows, then sampling or
    acceptance, and the stop rules."""
    s = state.settings
    running = [r for r in state.slots if r is not None]
    chunk = {r.slot: min(len(r.tokens) - r.computed, s.prefill_chunk) for r in running}
    proposals, draft_lengths = {}, {}
    if state.draft is not None:
        decoding = {r.slot for r in running if r.generated and r.computed == len(r.tokens) - 1}
        ends = {r.slot: r.computed + chunk[r.slot] for r in running}
        proposals, draft_lengths = propose(state.draft, running, ends, decoding, s.prefill_chunk, s.invariant)
    feeds = {}
    for r in running:
        drafts = proposals[r.slot].tokens if r.slot in proposals else ()
        toks = r.tokens[r.computed:r.computed + chunk[r.slot]] + drafts
        feeds[r.slot] = Feed(r.computed, toks, tuple(range(len(toks))) if drafts else (len(toks) - 1,))
    fed, logits = call_rows(params, cfg, state.cache, feeds, s.invariant)

    events, slots, counters = [], list(state.slots), state.counters
    for r in running:
        n = min(fed[r.slot], chunk[r.slot])  # prompt (or last) tokens fed; the rest are drafts
        computed = r.computed + n
        if r.slot in draft_lengths:
            r = replace(r, draft_computed=draft_lengths[r.slot])
        if computed < len(r.tokens):  # still prefilling
            slots[r.slot] = replace(r, computed=computed)
            continue
        if computed == len(r.request.prompt):
            counters = replace(counters, prompt_tokens=counters.prompt_tokens + len(r.request.prompt),
                               cached_tokens=counters.cached_tokens + r.cached)
            if state.prefix is not None:
                state.prefix.insert(r.request.prompt, cache=state.cache, row=PAD_ROWS + r.slot)
        row_logits = logits[r.slot]
        proposal = proposals.get(r.slot)
        k = fed[r.slot] - n  # drafts that fit the call
        if proposal is not None and k:
            proposal = replace(proposal, tokens=proposal.tokens[:k], q=None if proposal.q is None else proposal.q[:k])
            kept = verify(r, row_logits, proposal, cfg.vocab_size)
            scored = [(t, *token_logprobs(row_logits[i], t, r.request)) for i, t in enumerate(kept)]
            counters = replace(counters, draft_tokens=counters.draft_tokens + k,
                               accepted_tokens=counters.accepted_tokens + len(kept) - 1)
        else:
            proposal, scored = None, [sample_row(row_logits[-1], r, cfg.vocab_size)]
            kept = (scored[0][0],)
        done = False
        for i, (token, logprob, top) in enumerate(scored):
            r = replace(r, tokens=(*r.tokens, token), computed=computed + i)
            ev, r, done = _finish_rules(r, token, logprob, top, state.detokenize)
            events.append(ev)
            counters = replace(counters, generated_tokens=counters.generated_tokens + 1)
            if done:
                break
        if done:
            slots[r.slot] = None
            counters = replace(counters, finished=counters.finished + 1)
        else:
            slots[r.slot] = replace(r, draft_computed=draft_computed(r.draft_computed, proposal, kept))
    counters = replace(counters, steps=counters.steps + 1)
    return replace(state, slots=tuple(slots), counters=counters), events


def _finish_rules(r: Running, token: int, logprob: float | None, top: tuple[tuple[int, float], ...],
                  detokenize: Detokenize) -> tuple[Event, Running, bool]:
    """The event for `token` (already appended to r.tokens) and whether the request ends:
    eos, a stop string, or max_tokens."""
    req = r.request
    generated = r.generated
    eos = token in req.eos
    length = len(generated) >= req.max_tokens
    text = detokenize([t for t in generated if t not in req.eos])
    new, text_state, stopped = release(text, r.text, req.stop, final=eos or length)
    reason = "stop" if eos or stopped else "length" if length else None
    first = len(generated) == 1
    ev = Event(req.id, token, new, logprob, top, reason,
               prompt_tokens=len(req.prompt) if first else None, cached_tokens=r.cached if first else None)
    return ev, replace(r, text=text_state), reason is not None


def run_requests(state: EngineState, params: Params, cfg: ModelConfig, requests: list[Request],
                 arrivals: list[int] | None = None, max_steps: int = 100_000) -> tuple[EngineState, dict[str, list[Event]]]:
    """Submit `requests` (request i before step `arrivals[i]`, default all at step 0) and step
    until every one has finished; returns the state and each request's events. Raises
    InputError if they have not finished after `max_steps` steps."""
    arrivals = arrivals or [0] * len(requests)
    out: dict[str, list[Event]] = {q.id: [] for q in requests}
    pending = sorted(zip(arrivals, range(len(requests)), strict=True))
    finished, step = 0, 0
    while finished < len(requests):
        if step >= max_steps:
            raise InputError(f"run_requests: {len(requests) - finished} requests unfinished after {max_steps} steps")
        while pending and pending[0][0] <= step:
            state = submit(state, requests[pending.pop(0)[1]], cfg)
        state, events = engine_step(state, params, cfg)
        for ev in events:
            out[ev.id].append(ev)
            finished += ev.finish_reason is not None
        step += 1
    return state, out
