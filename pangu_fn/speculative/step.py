"""spec_init and spec_step: speculative decoding as a pure step function over an explicit state.

Invariant between steps, for row b with `n = lengths[b]` tokens so far (prompt + generated):
`tokens[b, :n]` are those tokens, and the target's cache holds the first `n - 1` of them
(everything but the last). A step drafts `d1 .. dK`, scores `[last, d1 .. dK]` with the target
in one call, keeps the accepted prefix plus one target token (a correction or the bonus
token), and rolls every cache back by setting its lengths: nothing is recomputed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..cache import KVCache
from ..device import synchronize
from ..errors import ConfigError, InputError
from ..generate import TokenEvent, check_prompts
from ..model import forward
from ..sampling import SamplingParams, penalize, probabilities, sample
from . import accept
from .adaptive import AdaptiveK
from .drafters import Drafter, Model


@dataclass(frozen=True)
class SpecState:
    """Everything a speculative decode carries between steps (rows still running only).

    `tokens [B, S]` each row's tokens, right-padded; `lengths [B]` how many are real (n);
    `last [B, 1]` each row's last token (`tokens[b, n - 1]`); `limits [B]` the most a row may reach (prompt + max_new_tokens); `rows` the index of each
    row in the caller's batch; `target_cache` holds n - 1 positions per row; `draft` the
    drafter's state; `seen [B, V]` (bool) the tokens the repetition penalty applies to, or
    None; `k` the draft length (the most per step with `adaptive`); `eos` the stop tokens.
    The buffers are donated to the next `spec_step`."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    last: torch.Tensor
    limits: torch.Tensor
    rows: tuple[int, ...]
    target_cache: KVCache
    draft: Any
    seen: torch.Tensor | None
    k: int
    adaptive: AdaptiveK | None
    eos: frozenset[int]


@dataclass(frozen=True)
class StepStats:
    """One step: `rows` running, draft length `k` used, `drafted` / `accepted` drafts summed
    over rows, `tokens` kept (accepted + 1 per row, before cutting at eos), and seconds spent
    drafting and verifying (target call + acceptance + rollback)."""

    rows: int
    k: int
    drafted: int
    accepted: int
    tokens: int
    draft_s: float
    verify_s: float


def spec_init(target: Model, drafter: Drafter, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              sampling: SamplingParams, rng: torch.Generator | None, eos_token_ids: Iterable[int] | None = None,
              k: int = 4, adaptive: AdaptiveK | bool | None = None) -> tuple[SpecState, list[TokenEvent]]:
    """Prefill the target and the drafter and sample each row's first token exactly as `stream`
    does (same prefill, same sampler, same generator draws). Returns the state and the first
    tokens' events; rows that already stopped are not in the state.

    `k` (>= 1) is the draft length, or with `adaptive` (True or an AdaptiveK) its upper bound.
    Raises InputError for bad prompts or k, ConfigError for a drafter that does not fit."""
    params, cfg = target.params, target.cfg
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise InputError(f"speculative: expected an int draft length k >= 1, found {k!r}")
    if isinstance(drafter, (str, tuple)):
        raise ConfigError(f"spec_init: expected a Drafter object, found {drafter!r:.40}; "
                          "make one with pangu_fn.speculative.make_drafter")
    drafter.check(target)
    if adaptive is True:
        adaptive = AdaptiveK(k_max=k)
    elif adaptive is False:
        adaptive = None
    if adaptive is not None:
        k = adaptive.k_max
        if adaptive.cost is None:
            adaptive = replace(adaptive, cost=drafter.cost(target))
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    eos = frozenset([cfg.eos_token_id] if eos_token_ids is None and cfg.eos_token_id is not None
                    else (eos_token_ids or ()))
    device = params["tok_embed"]["weight"].device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    B, T = len(prompts), int(lengths.max())
    room = T + max_new_tokens + k + 1
    tokens = torch.zeros(B, room, dtype=torch.int64, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, p] = True

    cache = target.init_cache(B, room)
    logits, cache = forward(params, cfg, tokens[:, :T], cache)
    cache = cache.with_lengths(lengths)
    first = sample(logits[torch.arange(B, device=device), lengths - 1], sampling, rng, seen)
    draft = drafter.start(target, tokens[:, :T], lengths, room)
    tokens.scatter_(1, lengths[:, None], first[:, None])
    if seen is not None:
        seen.scatter_(1, first[:, None], True)
    state = SpecState(tokens, lengths + 1, first[:, None], lengths + max_new_tokens, tuple(range(B)), cache, draft,
                      seen, k, adaptive, eos)
    kept = [[t] for t in first.tolist()]
    return _finish_rows(drafter, state, kept, max_new_tokens == 1)


def spec_step(target: Model, drafter: Drafter, state: SpecState, sampling: SamplingParams,
              rng: torch.Generator | None) -> tuple[SpecState, list[TokenEvent], StepStats]:
    """One speculative step for every running row: draft, verify in one target call, accept,
    roll back. Returns the new state (finished rows removed), this step's TokenEvents (row
    ids of the caller's batch, `finish_reason` on a row's last token) and its StepStats.

    Greedy sampling keeps a draft iff it equals the target's argmax, so the tokens equal plain
    greedy decoding; otherwise the rejection rule of `accept.rejection_sample` keeps the
    target's distribution. Each row accepts its own number of drafts. The state's buffers
    (tokens, caches, seen) are donated: they are updated in place and reused."""
    cfg = target.cfg
    n, device = state.lengths, state.lengths.device
    t0, c0 = time.perf_counter(), _cpu_clock(device)
    k = state.k if state.adaptive is None else state.adaptive.choose()
    draft, drafts, q, counts = state.draft, None, None, None
    if k > 0:
        n_max, room_max = torch.stack([n.max(), (state.limits - n).max()]).tolist()
        k = min(k, min(cfg.max_seq_len, state.target_cache.max_len) - n_max, room_max - 1)
    if k > 0:
        draft, drafts, q, counts = drafter.propose(target, state, k, sampling, rng)
        k = drafts.shape[1]
    _sync(device)
    t1, c1 = time.perf_counter(), _cpu_clock(device)

    if k == 0:  # a plain decode step, as lean as `stream`'s
        logits, cache = target.forward(state.last, state.target_cache)
        nxt = sample(logits[:, 0], sampling, rng, state.seen)
        state.tokens.scatter_(1, n[:, None], nxt[:, None])
        if state.seen is not None:
            state.seen.scatter_(1, nxt[:, None], True)
        new_lengths = n + 1
        host = torch.stack([torch.zeros_like(n), torch.zeros_like(n), state.limits - new_lengths, nxt], 1).tolist()
        state = replace(state, lengths=new_lengths, last=nxt[:, None], target_cache=cache.with_lengths(n), draft=draft)
    else:
        counts = torch.full_like(n, k) if counts is None else counts
        counts = torch.minimum(counts, state.limits - n - 1)  # never pass a row's max_new_tokens
        logits, cache = target.forward(torch.cat([state.last, drafts], 1), state.target_cache)
        if state.seen is not None:
            logits = penalize(logits.float(), _seen_after_drafts(state.seen, drafts), sampling.repetition_penalty)
        if sampling.greedy:
            accepted, nxt = accept.greedy_accept(logits, drafts, counts)
        else:
            accepted, nxt = accept.rejection_sample(probabilities(logits, sampling), q, drafts, counts, rng)
        kept = torch.cat([drafts, nxt[:, None]], 1).scatter_(1, accepted[:, None], nxt[:, None])
        state.tokens.scatter_(1, n[:, None] + torch.arange(k + 1, device=device), kept)
        new_lengths = n + accepted + 1
        if state.seen is not None:  # mark the kept tokens (kept[:, 0] is always kept)
            valid = torch.arange(k + 1, device=device) <= accepted[:, None]
            state.seen.scatter_(1, torch.where(valid, kept, kept[:, :1]), True)
        host = torch.cat([accepted[:, None], counts[:, None], (state.limits - new_lengths)[:, None], kept],
                         1).tolist()
        state = replace(state, lengths=new_lengths, last=nxt[:, None], target_cache=cache.with_lengths(new_lengths - 1),
                        draft=drafter.commit(draft, new_lengths))
    kept_lists = [row[3: 4 + row[0]] for row in host]
    state, events = _finish_rows(drafter, state, kept_lists, [row[2] <= 0 for row in host])
    _sync(device)
    t2, c2 = time.perf_counter(), _cpu_clock(device)
    n_accepted, drafted = sum(row[0] for row in host), sum(row[1] for row in host)
    if state.adaptive is not None:
        examined = sum(row[0] + (row[0] < row[1]) for row in host if row[1] > 0)
        draft_s, verify_s = (t1 - t0, t2 - t1) if c0 is None else (c1 - c0, c2 - c1)
        state = replace(state, adaptive=state.adaptive.update(k, n_accepted, examined, draft_s, verify_s))
    stats = StepStats(rows=len(host), k=k, drafted=drafted, accepted=n_accepted,
                      tokens=sum(len(t) for t in kept_lists), draft_s=t1 - t0, verify_s=t2 - t1)
    return state, events, stats


def _finish_rows(drafter: Drafter, state: SpecState, kept: list[list[int]],
                 at_limit: bool | list[bool]) -> tuple[SpecState, list[TokenEvent]]:
    """Events for each row's kept tokens, cut after the first eos; rows that stop leave the state."""
    events, running = [], []
    for i, (row, toks) in enumerate(zip(state.rows, kept)):
        limit = at_limit if isinstance(at_limit, bool) else at_limit[i]
        stop = next((j for j, t in enumerate(toks) if t in state.eos), None)
        if stop is not None:
            toks = toks[: stop + 1]
        for j, t in enumerate(toks):
            last = j == len(toks) - 1
            reason = ("eos" if stop is not None else "length" if limit else None) if last else None
            events.append(TokenEvent(row, t, reason))
        if stop is None and not limit:
            running.append(i)
    if len(running) < len(state.rows):
        state = _select(drafter, state, running)
    return state, events


def _select(drafter: Drafter, state: SpecState, keep: list[int]) -> SpecState:
    if not keep:
        return replace(state, rows=())
    idx = torch.tensor(keep, device=state.lengths.device)
    return replace(state, tokens=state.tokens[idx], lengths=state.lengths[idx], last=state.last[idx],
                   limits=state.limits[idx],
                   rows=tuple(state.rows[i] for i in keep), target_cache=state.target_cache.select_rows(idx),
                   draft=drafter.select_rows(state.draft, idx),
                   seen=None if state.seen is None else state.seen[idx])


def _seen_after_drafts(seen: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """`[B, K+1, V]`: the penalty's token set at each verified position (position i has also
    seen d1 .. di)."""
    B, K = drafts.shape
    steps = seen[:, None].expand(B, K + 1, seen.shape[1]).clone()
    for i in range(K):
        steps[:, i + 1:].scatter_(2, drafts[:, i, None, None].expand(B, K - i, 1), True)
    return steps


def _cpu_clock(device: torch.device) -> float | None:
    """On the CPU, the process's CPU time: what AdaptiveK compares, immune to the waits of a
    preempted process on a shared machine (wall time includes them). None elsewhere."""
    return time.process_time() if device.type == "cpu" else None


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        synchronize(device)
