"""Speculative decoding inside the engine's step: drafting for every decoding row, and each
row's acceptance of its drafts after the step's one target call.

A `Draft` (part of the engine state) holds the drafter's fixed pieces, taken from
`pangu_fn.speculative`'s drafters (`PromptLookup`, `DraftModel`, `SelfDraft`, `LookupFirst`), and a
draft model's own KV cache: one row per engine slot, in the target cache's layout
(`batch.PAD_ROWS + slot`), so a slot freed for the target is freed for the draft too. Each
step, before the target call:

1. lookup (when the drafter has one) proposes up to k tokens per decoding row, from its context;
2. a draft model (when there is one) runs one call in which every running row feeds the tokens
   it has not seen yet (a prefilling row the same prompt chunk as the target, so the draft
   prefills in chunks too; a decoding row the one or two tokens kept since its last draft),
   then one call per further draft token for the rows that draft with it (with `LookupFirst`,
   rows where lookup found nothing).

Every call goes through `batch.call_rows`, so a row's drafts do not depend on the batch, and each
row draws from its own generator. Acceptance (`verify`) is `pangu_fn.speculative.accept`'s
rule applied to one row at a time: greedy rows keep the drafts equal to the target's argmax and
the target's token after them (the tokens of plain greedy decoding); sampled rows use the
rejection rule with the row's generator (the target's distribution, not its token sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..cache import KVCache, compute_dtype, init_cache
from ..config import ModelConfig
from ..errors import InputError
from ..params import Params
from ..sampling import SamplingParams, greedy_tokens, probabilities
from ..speculative import accept
from ..speculative.drafters import DraftModel, LookupFirst, Model, PromptLookup, SelfDraft, load_drafter, make_drafter
from .batch import MIN_WIDTH, Feed, call_rows
from .sampler import adjusted_logits

if TYPE_CHECKING:
    from .engine import Running


@dataclass(frozen=True, eq=False)  # holds tensors
class Draft:
    """The engine's drafter: `k` tokens per decoding row at most, `lookup` (or None), a draft
    `model` (or None) and its `cache` (`rows x model context`; its buffers are donated)."""

    name: str
    k: int
    lookup: PromptLookup | None
    model: Model | None
    cache: KVCache | None


@dataclass(frozen=True)
class Proposal:
    """One row's drafts and the distribution each was drawn from (`q [k, V]`; None when
    deterministic: lookup, or greedy drafting), and how many of them the draft model was fed
    (its cache holds them past the row's tokens)."""

    tokens: tuple[int, ...]
    q: torch.Tensor | None
    fed: int = 0


class _Context(NamedTuple):
    """What `PromptLookup.propose` reads of a speculative state: right-padded `tokens [B, W]`
    and their `lengths [B]`."""

    tokens: torch.Tensor
    lengths: torch.Tensor


def make_draft(drafter: Any, params: Params, cfg: ModelConfig, rows: int, k: int, dtype: Any = None) -> Draft:
    """The engine's Draft for a drafter: a `--draft` spec string ("lookup", "self", a model
    folder, "lookup+" before one of those; see `load_drafter`) or a drafter object (anything
    `make_drafter` takes; a folder loads in `dtype`, default the target's). A draft model gets a
    cache of `rows` rows. Raises ConfigError for a drafter that cannot draft for this model,
    InputError for k < 1."""
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise InputError(f"engine: expected an int draft length k >= 1, found {k!r}")
    device = params["tok_embed"]["weight"].device
    dtype = dtype or compute_dtype(params)
    drafter = load_drafter(drafter, device, dtype) if isinstance(drafter, str) else make_drafter(drafter)
    target = Model(params, cfg)
    drafter.check(target)
    lookup, model = (drafter.lookup, drafter.fallback) if isinstance(drafter, LookupFirst) else (None, drafter)
    if isinstance(model, PromptLookup):
        lookup, model = model, None
    elif isinstance(model, SelfDraft):
        model = model.start(target, None, None, cfg.max_seq_len)
    elif isinstance(model, DraftModel):
        model = Model(model.params, model.cfg)
    else:
        raise InputError(f"engine: expected a lookup, self or draft-model drafter, found {drafter.name!r}")
    cache = None if model is None else init_cache(model.params, model.cfg, rows, model.cfg.max_seq_len)
    return Draft(drafter.name, k, lookup, model, cache)


def uses_model(draft: Draft, r: Running) -> bool:
    """Whether request r can draft with the model: all its positions and k drafts fit the draft's
    context with a call's padding to spare (decided once per request, whatever else runs)."""
    req = r.request
    return draft.model is not None and len(req.prompt) + req.max_tokens + draft.k + MIN_WIDTH <= draft.cache.max_len


def propose(draft: Draft, running: list[Running], ends: dict[int, int], decoding: set[int],
            prefill_chunk: int, invariant: bool) -> tuple[dict[int, Proposal], dict[int, int]]:
    """Drafts for the decoding slots (`decoding`, whose rows have sampled a token), and the draft
    cache's new length per running slot that uses the model. `ends[slot]` is where this
    step's target call ends the row (its tokens through the last, for decoding rows). A row
    drafts at most k tokens and never past its max_tokens."""
    ks = {r.slot: min(draft.k, r.request.max_tokens - len(r.generated) - 1) for r in running if r.slot in decoding}
    ks = {slot: k for slot, k in ks.items() if k > 0}
    by_slot = {r.slot: r for r in running}
    out: dict[int, Proposal] = {}
    if draft.lookup is not None and ks:
        out = _lookup(draft.lookup, [by_slot[s] for s in sorted(ks)], ks)
    if draft.model is None:
        return out, {}
    users = [r for r in running if uses_model(draft, r)]
    if not users:
        return out, {}
    wanted = {s for s in ks if s not in out and uses_model(draft, by_slot[s])}
    feeds = {}
    for r in users:
        toks = r.tokens[r.draft_computed:min(ends[r.slot], r.draft_computed + prefill_chunk)]
        whole = r.draft_computed + len(toks) == len(r.tokens)
        feeds[r.slot] = Feed(r.draft_computed, toks, (len(toks) - 1,) if r.slot in wanted and whole else ())
    fed, logits = call_rows(draft.model.params, draft.model.cfg, draft.cache, feeds, invariant)
    computed = {slot: feeds[slot].start + n for slot, n in fed.items()}
    drafts: dict[int, list[int]] = {}
    qs: dict[int, list[torch.Tensor]] = {}
    for slot in wanted:
        if len(logits[slot]) and computed[slot] == len(by_slot[slot].tokens):
            drafts[slot], qs[slot] = [], []
            _draw(by_slot[slot], logits[slot][0], drafts[slot], qs[slot], draft.model.cfg.vocab_size)
    for i in range(1, max((ks[s] for s in drafts), default=0)):
        going = {s for s, d in drafts.items() if len(d) < ks[s]}
        # every user row is in the call, the others feeding nothing past the drafts they were fed,
        # so that no row's cached positions are overwritten by the padding of the call
        feeds = {s: Feed(computed[s] + i - 1, (drafts[s][-1],), (0,)) if s in going
                 else Feed(computed[s] + max(len(drafts.get(s, ())) - 1, 0), (), ()) for s in computed}
        _, logits = call_rows(draft.model.params, draft.model.cfg, draft.cache, feeds, invariant)
        for s in going:
            _draw(by_slot[s], logits[s][0], drafts[s], qs[s], draft.model.cfg.vocab_size)
    for s, d in drafts.items():
        out[s] = Proposal(tuple(d), torch.stack(qs[s]) if qs[s] else None, fed=len(d) - 1)
    return out, computed


def verify(r: Running, logits: torch.Tensor, proposal: Proposal, vocab_size: int) -> tuple[int, ...]:
    """The tokens row r keeps: its accepted drafts and the target's token after them, from the
    target's `logits [k+1, V]` at its last token and its k drafts (k >= 1). Penalties apply at
    each position as if the drafts before it had been generated."""
    req, drafts = r.request, proposal.tokens
    k = len(drafts)
    adjusted = torch.stack([adjusted_logits(logits[i], req, r.tokens + drafts[:i], vocab_size) for i in range(k + 1)])
    d = torch.tensor([drafts], device=logits.device)
    counts = torch.tensor([k], device=logits.device)
    if req.sampling.greedy:
        accepted, nxt = accept.greedy_accept(adjusted[None], d, counts)
    else:
        q = None if proposal.q is None else proposal.q[None]
        accepted, nxt = accept.rejection_sample(probabilities(adjusted[None], req.sampling), q, d, counts, r.generator)
    a = int(accepted[0])
    return (*drafts[:a], int(nxt[0]))


def draft_computed(before: int, proposal: Proposal | None, kept: tuple[int, ...]) -> int:
    """The draft cache's valid length for a row after a step: `before` (after the catch-up
    call) plus the leading fed drafts that the row kept (the cache holds them already)."""
    if proposal is None:
        return before
    same, most = 0, min(proposal.fed, len(proposal.tokens), len(kept))
    while same < most and proposal.tokens[same] == kept[same]:
        same += 1
    return before + same


def _lookup(lookup: PromptLookup, rows: list[Running], ks: dict[int, int]) -> dict[int, Proposal]:
    width = max(len(r.tokens) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r.tokens)] = torch.tensor(r.tokens)
    lengths = torch.tensor([len(r.tokens) for r in rows])
    _, looked, _, counts = lookup.propose(None, _Context(tokens, lengths), max(ks.values()), SamplingParams(), None)
    if not looked.shape[1]:
        return {}
    out = {}
    for i, r in enumerate(rows):
        n = min(int(counts[i]), ks[r.slot])
        if n:
            out[r.slot] = Proposal(tuple(looked[i, :n].tolist()), None)
    return out


def _draw(r: Running, logits: torch.Tensor, drafts: list[int], qs: list[torch.Tensor], vocab_size: int) -> None:
    """Append the draft model's next token for row r (greedy: the argmax after penalties;
    sampled: a draw from its distribution with the row's generator, kept in `qs`)."""
    req = r.request
    adjusted = adjusted_logits(logits, req, r.tokens + tuple(drafts), vocab_size)
    if req.sampling.greedy:
        drafts.append(int(greedy_tokens(adjusted)))
        return
    q = probabilities(adjusted[None], req.sampling)[0]
    drafts.append(int(torch.multinomial(q, 1, generator=r.generator)))
    qs.append(q)
