"""Drafters: what proposes the tokens a speculative step verifies.

Three kinds share one small protocol (`Drafter`): a separate draft model (`DraftModel`), the
target's own first N layers with its final norm and head (`SelfDraft`), and n-gram lookup in
the context (`PromptLookup`, no model); `LookupFirst` chains lookup in front of a model
drafter. A drafter object holds only fixed things (parameters, settings); its per-batch state
(a KV cache, or nothing) is an explicit value that `spec_step` threads through
`SpecState.draft`, rolled back by lengths like the target's cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from ..cache import KVCache, init_cache
from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..model import forward
from ..params import Params
from ..sampling import SamplingParams, greedy_tokens, penalize, probabilities
from ..tree import nbytes

if TYPE_CHECKING:
    from .step import SpecState


class Model(NamedTuple):
    """A model as the speculative functions take it: its parameter tree and config, and the
    compiled programs (`pangu_fn.compiled.Programs`) its calls run through (None: eager)."""

    params: Params
    cfg: ModelConfig
    compiled: Any = None

    def forward(self, tokens: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """`model.forward(params, cfg, tokens, cache)`, compiled when `compiled` is set."""
        if self.compiled is None:
            return forward(self.params, self.cfg, tokens, cache)
        return self.compiled.forward(self.params, tokens, cache)

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A fresh cache of at least `max_len` positions (a static bucket when compiled)."""
        if self.compiled is None:
            return init_cache(self.params, self.cfg, batch_size, max_len)
        return self.compiled.init_cache(self.params, batch_size, max_len)


# propose() returns (new drafter state, drafts [B, k'] int64 with k' <= k, draft probabilities
# [B, k', V] or None when the drafts are deterministic, valid drafts per row [B] or None = all k').
Proposal = tuple[Any, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


class Drafter(Protocol):
    """What `spec_step` needs from a drafter. `state` is the drafter's own per-batch value."""

    name: str

    def check(self, target: Model) -> None:
        """Raise ConfigError when this drafter cannot draft for `target` (another vocabulary)."""

    def cost(self, target: Model) -> float:
        """Estimated cost of drafting one token, in target decode steps (for AdaptiveK)."""

    def start(self, target: Model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_len: int) -> Any:
        """The initial state for right-padded `prompts [B, T]` of `prompt_lengths [B]`, with room
        for `max_len` positions per row."""

    def propose(self, target: Model, spec: SpecState, k: int, sampling: SamplingParams,
                rng: torch.Generator | None) -> Proposal:
        """Up to `k >= 1` tokens per row continuing `spec.tokens[b, :spec.lengths[b]]`."""

    def commit(self, state: Any, lengths: torch.Tensor) -> Any:
        """The state after the rows kept their first `lengths [B]` tokens (rollback by length)."""

    def select_rows(self, state: Any, rows: torch.Tensor) -> Any:
        """The state of only the given rows (finished rows leave the batch)."""


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: it holds tensors
class DraftModel:
    """A separate, smaller model with the target's vocabulary (e.g. the demo draft). Its state
    is its own KVCache holding each row's tokens but the last (one fewer after a step that
    accepted every draft: the next proposal feeds the missing token first, no extra call)."""

    params: Params
    cfg: ModelConfig
    name: str = "draft"

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _draft_tree(self.params, self.cfg))

    def check(self, target: Model) -> None:
        _same_vocab(self.cfg, target.cfg, "draft model")

    def cost(self, target: Model) -> float:
        return _relative_cost(self.params, self.cfg, target)

    def start(self, target: Model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_len: int) -> KVCache:
        if prompts.shape[1] > self.cfg.max_seq_len:
            raise InputError(f"speculative: a prompt of {prompts.shape[1]} tokens exceeds the draft model's "
                             f"context length {self.cfg.max_seq_len}")
        cache = init_cache(self.params, self.cfg, prompts.shape[0], max_len)
        _, cache = forward(self.params, self.cfg, prompts, cache)
        return cache.with_lengths(prompt_lengths)

    def propose(self, target: Model, spec: SpecState, k: int, sampling: SamplingParams,
                rng: torch.Generator | None) -> Proposal:
        cache: KVCache = spec.draft
        n = spec.lengths
        behind = n - 1 - cache.lengths  # tokens the draft has not seen yet, besides the last one
        most_behind, longest, n_max = torch.stack([behind.max(), cache.lengths.max(), n.max()]).tolist()
        width = most_behind + 1
        limit = min(self.cfg.max_seq_len, cache.max_len)
        k = min(k, limit - n_max + 1)
        if k < 1 or longest + width > limit:
            return cache, spec.tokens[:, :0], None, None
        # row b feeds its unseen tokens left-aligned, padded by repeating its last token
        cols = torch.minimum(cache.lengths[:, None] + torch.arange(width, device=n.device), (n - 1)[:, None])
        first = spec.tokens.gather(1, cols)
        return _autoregress(Model(self.params, self.cfg), cache, first, behind, n, k, sampling, spec.seen, rng)

    def commit(self, state: KVCache, lengths: torch.Tensor) -> KVCache:
        return state.with_lengths(torch.minimum(state.lengths, lengths - 1))

    def select_rows(self, state: KVCache, rows: torch.Tensor) -> KVCache:
        return state.select_rows(rows)


@dataclass(frozen=True)
class SelfDraft:
    """The target's first `layers` blocks (default a quarter, at least one) followed by its final
    norm and head: a draft model for free. It shares the target's KV cache: those blocks
    compute the same keys and values for accepted tokens as the full target does, and the
    verification call overwrites whatever the draft wrote. Its state is the truncated model."""

    layers: int | None = None
    name: str = "self"

    def num_layers(self, target: Model) -> int:
        return self.layers if self.layers is not None else max(1, target.cfg.num_layers // 4)

    def check(self, target: Model) -> None:
        n = self.num_layers(target)
        if not (isinstance(n, int) and 1 <= n <= target.cfg.num_layers):
            raise ConfigError(f"SelfDraft: expected 1 <= layers <= {target.cfg.num_layers} (the target's "
                              f"blocks), found {n!r}")

    def cost(self, target: Model) -> float:
        return (self.num_layers(target) + _FIXED_BLOCKS) / (target.cfg.num_blocks + _FIXED_BLOCKS)

    def start(self, target: Model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_len: int) -> Model:
        n = self.num_layers(target)
        params = {name: tree for name, tree in target.params.items() if name not in ("query_layer", "query_embed")}
        params["blocks"] = list(target.params["blocks"][:n])
        return Model(params, target.cfg.replace(num_layers=n, query_layer=False))

    def propose(self, target: Model, spec: SpecState, k: int, sampling: SamplingParams,
                rng: torch.Generator | None) -> Proposal:
        model: Model = spec.draft
        n_layers = model.cfg.num_layers
        shared = spec.target_cache
        cache = KVCache(shared.keys[:n_layers], shared.values[:n_layers], shared.lengths)
        _, drafts, probs, counts = _autoregress(model, cache, spec.last, None, None, k, sampling, spec.seen, rng)
        return model, drafts, probs, counts

    def commit(self, state: Model, lengths: torch.Tensor) -> Model:
        return state

    def select_rows(self, state: Model, rows: torch.Tensor) -> Model:
        return state


@dataclass(frozen=True)
class PromptLookup:
    """No model: find the latest earlier occurrence of the context's last n-gram (the longest n
    from `max_ngram` down to `min_ngram` that occurs) and propose the tokens that followed it.
    When the match is closer than k tokens to the end, the proposal continues the repeat with
    that period. Rows without a match propose nothing; the drafts are deterministic (q is
    one-hot), so sampling stays lossless through the same rejection rule."""

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "lookup"

    def check(self, target: Model) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"PromptLookup: expected 1 <= min_ngram <= max_ngram, found "
                              f"{self.min_ngram} and {self.max_ngram}")

    def cost(self, target: Model) -> float:
        return 0.0

    def start(self, target: Model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_len: int) -> None:
        return None

    def propose(self, target: Model, spec: SpecState, k: int, sampling: SamplingParams,
                rng: torch.Generator | None) -> Proposal:
        n = spec.lengths[:, None]
        width = int(n.max())
        tokens = spec.tokens[:, :width]
        end = torch.full_like(n, -1)
        for g in range(min(self.max_ngram, width - 1), self.min_ngram - 1, -1):
            suffix = tokens.gather(1, (n - g + torch.arange(g, device=n.device)).clamp_min(0))
            hit = (tokens.unfold(1, g, 1) == suffix[:, None, :]).all(-1)  # window j ends before j + g
            ends = torch.arange(g, width + 1, device=n.device)
            latest = torch.where(hit & (ends <= n - 1), ends, -1).amax(1, keepdim=True)
            end = torch.where(end < 0, latest, end)
        found = end >= 0
        if not bool(found.any()):
            return None, tokens[:, :0], None, None
        period = torch.where(found, n - end, 1)
        cols = end.clamp_min(0) + torch.arange(k, device=n.device) % period
        counts = torch.where(found[:, 0], k, 0)
        return None, tokens.gather(1, cols), None, counts

    def commit(self, state: None, lengths: torch.Tensor) -> None:
        return None

    def select_rows(self, state: None, rows: torch.Tensor) -> None:
        return None


@dataclass(frozen=True, eq=False)  # holds a drafter that may hold tensors
class LookupFirst:
    """Prompt lookup first, a model drafter where lookup finds nothing. A row whose context
    repeats its last `lookup.min_ngram`+ tokens (default 2) takes lookup's drafts; when every
    running row does, the step drafts at no model cost, otherwise `fallback` drafts for the
    batch and the other rows take its drafts. The state is the fallback's: a draft model's cache
    keeps only the real tokens of rows that took lookup's drafts, and a draft model that sat
    out steps feeds the tokens it missed in its next call (`DraftModel` catches up that way)."""

    fallback: Any
    lookup: PromptLookup = PromptLookup(max_ngram=3, min_ngram=2)

    @property
    def name(self) -> str:
        return f"lookup+{self.fallback.name}"

    def check(self, target: Model) -> None:
        if isinstance(self.fallback, (PromptLookup, LookupFirst)):
            raise ConfigError(f"LookupFirst: expected a model drafter as the fallback, found {self.fallback.name!r}")
        self.lookup.check(target)
        self.fallback.check(target)

    def cost(self, target: Model) -> float:
        return self.fallback.cost(target)

    def start(self, target: Model, prompts: torch.Tensor, prompt_lengths: torch.Tensor, max_len: int) -> Any:
        return self.fallback.start(target, prompts, prompt_lengths, max_len)

    def propose(self, target: Model, spec: SpecState, k: int, sampling: SamplingParams,
                rng: torch.Generator | None) -> Proposal:
        _, looked, _, found = self.lookup.propose(target, spec, k, sampling, rng)
        if looked.shape[1] and bool((found > 0).all()):
            return spec.draft, looked, None, found
        state, drafts, q, counts = self.fallback.propose(target, spec, k, sampling, rng)
        width = drafts.shape[1]
        if not looked.shape[1]:  # no row has a match
            return state, drafts, q, counts
        if not width:  # the fallback had no room left to draft
            return state, looked, None, found
        use = found > 0  # rows taking lookup's drafts (cut to the fallback's width)
        drafts = torch.where(use[:, None], looked[:, :width], drafts)
        if q is not None:
            q = torch.where(use[:, None, None], F.one_hot(looked[:, :width], q.shape[-1]).to(q.dtype), q)
        counts = torch.where(use, width, width if counts is None else counts)
        if isinstance(state, KVCache):  # past the context it holds its own drafts, not lookup's
            state = state.with_lengths(torch.where(use, torch.minimum(state.lengths, spec.lengths), state.lengths))
        return state, drafts, q, counts

    def commit(self, state: Any, lengths: torch.Tensor) -> Any:
        return self.fallback.commit(state, lengths)

    def select_rows(self, state: Any, rows: torch.Tensor) -> Any:
        return self.fallback.select_rows(state, rows)


def make_drafter(spec: Any) -> Drafter:
    """A drafter from `"self"`, `"lookup"`, a `(params, cfg)` pair (a draft model) or a drafter."""
    if isinstance(spec, str):
        if spec == "self":
            return SelfDraft()
        if spec == "lookup":
            return PromptLookup()
        raise ConfigError(f"speculative: unknown drafter {spec!r}; expected 'self', 'lookup', "
                          "a (params, cfg) draft model or a Drafter")
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], ModelConfig):
        return DraftModel(spec[0], spec[1])
    if all(hasattr(spec, m) for m in ("check", "start", "propose", "commit", "select_rows")):
        return spec
    raise ConfigError(f"speculative: expected a drafter, found {type(spec).__name__}")


def load_drafter(spec: str, device: Any = None, dtype: Any = None) -> Drafter:
    """A drafter from a command-line spec: "self" (a quarter of the target's layers),
    "self:N" (N layers), "lookup", "lookup:N" (n-grams up to N), a model folder (a draft
    model, loaded with `pangu_fn.io.load`), or "lookup+" before a self or folder spec
    (`LookupFirst`). Raises ConfigError for anything else."""
    if spec.startswith("lookup+"):
        return LookupFirst(load_drafter(spec.removeprefix("lookup+"), device, dtype))
    name, _, arg = spec.partition(":")
    if name in ("self", "lookup") and arg:
        try:
            n = int(arg)
        except ValueError:
            raise ConfigError(f"--draft {spec!r}: expected an integer after '{name}:'") from None
        return SelfDraft(layers=n) if name == "self" else PromptLookup(max_ngram=n)
    if spec in ("self", "lookup"):
        return make_drafter(spec)
    from pathlib import Path

    from ..io import load

    if not Path(spec).is_dir():
        raise ConfigError(f"--draft {spec!r}: expected 'self', 'self:N', 'lookup', 'lookup:N', a model folder, "
                          "or 'lookup+' before a self or folder spec")
    params, cfg = load(spec, device=device, dtype=dtype)
    return DraftModel(params, cfg, name=f"draft:{Path(spec).name}")


# The embedding, positions, final norm, head and per-call setup of a forward cost roughly this
# many blocks' worth of time at the small sizes where per-op overhead dominates (measured on
# the demo shapes: a 1-block draft costs 0.21-0.23 of an 8-block target).
_FIXED_BLOCKS = 1.0


def _draft_tree(params: Params, cfg: ModelConfig) -> Params:
    """The draft's tree as it decodes fastest: q, k, v and gate, up fused into one product each
    (`fuse_projections`), and for a bf16 CPU draft every linear a `DenseWeight` leaf
    (`quantize(params, "bf16")`: the native bf16 kernel, or oneDNN's prepacked copy where that
    cannot run). A draft decodes one row per call, where per-call overhead dominates: fused and
    prepacked, the demo draft's decode call took 0.8x the time of the plain tree's with oneDNN.
    The draft's numbers only decide what is proposed, never what is kept. A tree with quantized
    leaves is used as it is."""
    from ..params import fuse_projections
    from ..quant import quantize
    from ..tree import flatten

    if any(not isinstance(leaf, torch.Tensor) for leaf in flatten(params).values()):
        return params  # already quantized or prepacked
    params = fuse_projections(params, cfg)
    w = params["tok_embed"]["weight"]
    if w.dtype == torch.bfloat16 and w.device.type == "cpu":
        params = quantize(params, "bf16")
    return params


def _relative_cost(params: Params, cfg: ModelConfig, target: Model) -> float:
    """Draft cost per token over the target's: the larger of the op-count ratio (small models,
    overhead-bound) and the weight-bytes ratio (large models, bandwidth-bound)."""
    ops = (cfg.num_blocks + _FIXED_BLOCKS) / (target.cfg.num_blocks + _FIXED_BLOCKS)
    return max(ops, nbytes(params) / max(1, nbytes(target.params)))


def _same_vocab(cfg: ModelConfig, target: ModelConfig, what: str) -> None:
    if cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"speculative: the {what} has a vocabulary of {cfg.vocab_size} tokens, the target "
                          f"{target.vocab_size}; a drafter must share the target's vocabulary")


def _autoregress(model: Model, cache: KVCache, first: torch.Tensor, at: torch.Tensor | None,
                 lengths: torch.Tensor | None, k: int, sampling: SamplingParams, seen: torch.Tensor | None,
                 rng: torch.Generator | None) -> Proposal:
    """Draft k tokens with `model`: one call on `first [B, T]` (its logits read at column `at[b]`,
    the last column when None; the cache then set to `lengths` when given), then one call
    per further token. Sampling applies the same temperature / top-k / top-p / penalty as
    the target's distribution, so q and p are comparable. The cache is donated."""
    params, cfg = model.params, model.cfg
    logits, cache = forward(params, cfg, first, cache)
    if at is None:
        logits = logits[:, -1]
    else:
        logits = logits[torch.arange(first.shape[0], device=first.device), at]
        cache = cache.with_lengths(lengths)
    penalty = sampling.repetition_penalty
    seen = seen.clone() if seen is not None and penalty != 1.0 else None
    drafts, probs = [], []
    for i in range(k):
        if i:
            logits, cache = forward(params, cfg, drafts[-1][:, None], cache)
            logits = logits[:, 0]
        if seen is not None:
            logits = penalize(logits.float(), seen, penalty)
        if sampling.greedy:
            tok = greedy_tokens(logits)
        else:
            q = probabilities(logits, sampling)
            tok = torch.multinomial(q, 1, generator=rng).squeeze(-1)
            probs.append(q)
        if seen is not None:
            seen.scatter_(1, tok[:, None], True)
        drafts.append(tok)
    return cache, torch.stack(drafts, 1), torch.stack(probs, 1) if probs else None, None
