"""forward(params, cfg, tokens, cache) -> (logits, cache): the one model definition.

All three families run through this file: the seed GPT-style and PanGu-α (learned
positions, LayerNorm, GELU; PanGu-α adds a top query layer after the final norm) and
openPangu-Embedded (RoPE, RMSNorm, SwiGLU, GQA). Eager PyTorch, torch.export and the ONNX
exporter all trace this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from .cache import KVCache, compute_dtype
from .config import ModelConfig
from .errors import InputError
from .layers import Context, block, linear, norm, rope_tables
from .params import Params


def forward(params: Params, cfg: ModelConfig, tokens: torch.Tensor, cache: KVCache | None = None,
            *, logits_index: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache | None]:
    """Logits `[B, T, V]` for `tokens [B, T]` (int64); with `logits_index [B]` only those of
    token `logits_index[b]` of each row, `[B, 1, V]` (a prefill needs just the last prompt
    token's, and the LM head is the largest matrix); with `logits_index [B, J]` those of J
    tokens per row, `[B, J, V]` (a verification step's drafted positions).

    Without a cache the tokens are a whole sequence starting at position 0 (causal scoring).
    With a cache, row b's tokens take positions `cache.lengths[b] .. + T - 1`: prefill and
    decode are the same call. The cache's buffers are **donated**: new keys and values are
    written into them in place, and the returned cache (same buffers, lengths + T) replaces
    the one passed in. Raises InputError for token ids outside the vocabulary or positions
    beyond the cache or the context length."""
    B, T = tokens.shape
    tracing = backend.tracing()
    if not tracing:
        _check_tokens(tokens, cfg)
    ctx = _context(cfg, tokens, cache, compute_dtype(params), tracing)

    embed_w = params["tok_embed"]["weight"]
    x = F.embedding(tokens, embed_w) if isinstance(embed_w, torch.Tensor) else embed_w.embedding(tokens)
    if cfg.positions == "learned":
        x = x + params["pos_embed"]["weight"][ctx.positions]

    fused = None if tracing or cache is None else backend.fused_blocks(params, cfg, x, ctx.positions, cache)
    x = fused if fused is not None else blocks(params, cfg, x, ctx, cache)

    head = params["lm_head"] if "lm_head" in params else params["tok_embed"]
    if logits_index is not None:
        rows = torch.arange(B, device=x.device)
        x = x[rows, logits_index][:, None] if logits_index.dim() == 1 else x[rows[:, None], logits_index]
    logits = linear(x, head)
    new_cache = None if cache is None else KVCache(cache.keys, cache.values, cache.lengths + T)
    return logits, new_cache


def blocks(params: Params, cfg: ModelConfig, x: torch.Tensor, ctx: Context, cache: KVCache | None) -> torch.Tensor:
    """Every block, the final norm and PanGu-α's query layer: `[B, T, H]` in and out."""

    def kv(i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if cache is None else (cache.keys[i], cache.values[i])

    for i, blk in enumerate(params["blocks"]):
        x = block(blk, cfg, x, ctx, kv(i))
    x = norm(x, params["final_norm"], cfg)
    if cfg.query_layer:
        query = params["query_embed"]["weight"][ctx.positions]
        x = block(params["query_layer"], cfg, x, ctx, kv(cfg.num_layers), query_input=query)
    return x


def _check_tokens(tokens: torch.Tensor, cfg: ModelConfig) -> None:
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise InputError(f"forward: expected integer tokens [B, T], found {tokens.dtype} {list(tokens.shape)}")
    if tokens.numel() == 0:
        raise InputError(f"forward: expected at least one token, found shape {list(tokens.shape)}")
    lo, hi = torch.aminmax(tokens)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"forward: token id {bad} outside the vocabulary [0, {cfg.vocab_size})")


def _context(cfg: ModelConfig, tokens: torch.Tensor, cache: KVCache | None,
             dtype: torch.dtype, tracing: bool) -> Context:
    """Positions, RoPE tables and the attention mask for one call."""
    B, T = tokens.shape
    steps = torch.arange(T, device=tokens.device)
    if cache is None:
        if not tracing and T > cfg.max_seq_len:
            raise InputError(f"forward: {T} tokens exceed the context length {cfg.max_seq_len}")
        positions, kv_len, mask, causal, write_at = steps.expand(B, T), T, None, True, None
    else:
        positions = cache.lengths[:, None] + steps
        kv_len, mask, causal, write_at = cache.max_len, None, False, None
        if tracing:
            mask = _mask(positions, kv_len)
        else:
            lengths = cache.lengths.tolist()
            kv_len = max(lengths) + T
            limit = min(cache.max_len, cfg.max_seq_len)
            if kv_len > limit:
                raise InputError(f"forward: writing {T} tokens after {max(lengths)} cached ones needs "
                                 f"{kv_len} positions; the cache holds {cache.max_len} and the context "
                                 f"length is {cfg.max_seq_len}")
            uniform = min(lengths) == max(lengths)
            write_at = lengths[0] if uniform else None
            if uniform and lengths[0] == 0:
                causal = True  # a fresh prefill: plain causal attention over the T new tokens
            elif not (uniform and T == 1):  # one new token after equal lengths sees everything
                mask = _mask(positions, kv_len)
    start = 0 if cache is None else write_at
    rope = rope_tables(positions, cfg, dtype, start) if cfg.positions == "rope" else None
    return Context(positions, kv_len, mask, causal, rope, write_at)


def _mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Boolean `[B, 1, T, kv_len]`: key slot j is visible to a query at position p iff j <= p."""
    slots = torch.arange(kv_len, device=positions.device)
    return (slots[None, None, None, :] <= positions[:, None, :, None])
