"""generate() and stream(): batched decoding of prompts of different lengths.

Ragged prompts are right-padded and prefilled in one call; each row's cache length is then
set to its true prompt length (the padding's cache entries are stale and get overwritten),
so every row decodes at its own position.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import compiled
from .cache import init_cache
from .compiled import CompileOptions
from .config import ModelConfig
from .errors import InputError
from .model import forward
from .params import Params
from .sampling import SamplingParams, sample


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of row `row`; `finish_reason` ("eos" | "length") is set on the
    row's last token."""

    row: int
    token: int
    finish_reason: str | None = None


@dataclass
class Completion:
    """The new tokens of one prompt (an eos token, when hit, is the last one) and why it stopped."""

    tokens: list[int]
    finish_reason: str


def check_prompts(prompts: Sequence[Sequence[int]], cfg: ModelConfig, max_new_tokens: int) -> list[list[int]]:
    """Validate prompts and lengths; returns them as lists of ints. Raises InputError."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
            isinstance(p, (list, tuple)) for p in prompts):
        raise InputError("generate: expected a non-empty list of prompts, each a list of token ids, "
                         f"found {type(prompts).__name__} {str(prompts)[:60]}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"generate: expected max_new_tokens >= 1, found {max_new_tokens!r}")
    out = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"generate: prompt {i} is empty; expected at least one token")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"generate: prompt {i} has token id {bad[0]!r} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise InputError(f"generate: prompt {i} has {len(p)} tokens + max_new_tokens {max_new_tokens} "
                             f"= {len(p) + max_new_tokens}, beyond the context length {cfg.max_seq_len}")
        out.append(list(p))
    return out


def stream(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           sampling: SamplingParams = SamplingParams(), seed: int = 0,  # noqa: B008 (frozen)
           eos_token_ids: Iterable[int] | None = None, *,
           compile: bool | str | CompileOptions = False) -> Iterator[TokenEvent]:
    """Yield TokenEvents as they are produced, step by step across rows.

    `eos_token_ids` None means `cfg.eos_token_id` (if any); pass `()` to never stop early.
    Runs on the device of the params. Sampling is reproducible for a given `seed`.
    `compile` (True, a torch.compile backend name or CompileOptions) runs the prefill and the
    decode step as compiled programs over a static cache (`pangu_fn.compiled`): the same tokens
    as eager decoding, logits within the dtype's rounding."""
    prompts = check_prompts(prompts, cfg, max_new_tokens)
    eos = set([cfg.eos_token_id] if eos_token_ids is None and cfg.eos_token_id is not None
              else (eos_token_ids or ()))
    device = params["tok_embed"]["weight"].device
    lengths = [len(p) for p in prompts]
    B, T = len(prompts), max(lengths)

    generator = torch.Generator(device=device).manual_seed(seed)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, p] = True

    opts = compiled.options(compile)
    with torch.inference_mode():
        if opts is None:
            tokens = torch.zeros(B, T, dtype=torch.int64, device=device)
            for i, p in enumerate(prompts):
                tokens[i, : len(p)] = torch.tensor(p, dtype=torch.int64)
            lengths_t = torch.tensor(lengths, device=device)
            cache = init_cache(params, cfg, B, T + max_new_tokens)
            logits, cache = forward(params, cfg, tokens, cache, logits_index=lengths_t - 1)
            cache = cache.with_lengths(lengths_t)
            last = logits[:, 0]
        else:
            progs = compiled.programs(params, cfg, opts)
            cache = compiled.static_cache(params, cfg, B, T + max_new_tokens, opts)
            last, cache = compiled.prefill(progs, params, prompts, cache)

    active = [True] * B
    for step in range(max_new_tokens):
        with torch.inference_mode():
            next_tokens = sample(last, sampling, generator, seen)
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
        for row, tok in enumerate(next_tokens.tolist()):
            if not active[row]:
                continue
            reason = "eos" if tok in eos else "length" if step == max_new_tokens - 1 else None
            if reason:
                active[row] = False
            yield TokenEvent(row, tok, reason)
        if not any(active):
            return
        with torch.inference_mode():
            if opts is None:
                logits, cache = forward(params, cfg, next_tokens[:, None], cache)
                last = logits[:, -1]
            else:
                last, _, cache = progs.decode(params, next_tokens, cache)


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), seed: int = 0,  # noqa: B008 (frozen)
             eos_token_ids: Iterable[int] | None = None, *,
             compile: bool | str | CompileOptions = False) -> list[Completion]:
    """New tokens for each prompt (a list of token-id lists of any lengths), with the reason
    each stopped. Same arguments and semantics as `stream`; compiled greedy decoding reads the
    tokens back once per `compiled.STOP_CHECK_EVERY` steps instead of every step."""
    opts = compiled.options(compile)
    if opts is not None and sampling.greedy and sampling.repetition_penalty == 1.0:
        checked = check_prompts(prompts, cfg, max_new_tokens)
        eos = [cfg.eos_token_id] if eos_token_ids is None and cfg.eos_token_id is not None else (eos_token_ids or ())
        return [Completion(toks, reason)
                for toks, reason in compiled.greedy_generate(params, cfg, checked, max_new_tokens, eos, opts)]
    out = [Completion([], "length") for _ in prompts]
    for ev in stream(params, cfg, prompts, max_new_tokens, sampling, seed, eos_token_ids, compile=compile):
        out[ev.row].tokens.append(ev.token)
        if ev.finish_reason:
            out[ev.row].finish_reason = ev.finish_reason
    return out
