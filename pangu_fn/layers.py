"""The building blocks of all three families, as functions of (params, config, activations).

Shapes: B batch, T new tokens, S attended positions, H hidden, D head_dim.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .config import ModelConfig
from .params import Params


def linear(x: torch.Tensor, p: Params) -> torch.Tensor:
    """`x @ W.T + b` for `p = {"weight": W [out, in], "bias"?: [out]}`. A weight that is not a
    tensor is a quantized leaf and brings its own kernel: `W.linear(x, bias)`. Few rows of bf16
    on the CPU go through the native bf16 kernel (`native.py`) where it runs."""
    w, b = p["weight"], p.get("bias")
    if not isinstance(w, torch.Tensor):
        return w.linear(x, b)
    if w.dtype == torch.bfloat16:
        y = native.dense_bf16_linear(x, w, b)
        if y is not None:
            return y
    parts = _split_k_parts(x, w)
    if parts > 1:
        return _split_k_linear(x, w, b, parts)
    return F.linear(x, w, b)


SPLIT_K_MAX_ROWS = 8


def _split_k_parts(x: torch.Tensor, w: torch.Tensor) -> int:
    """How many threads share a few-row fp32 product on the CPU (1 = use F.linear).

    torch's CPU matrix-vector product runs on one thread (about 20 GB/s of weights here), while
    a batched product over K-slices runs one slice per thread: 1.7x faster on GPT-2-small's
    blocks and 2x on its LM head at 2 threads. It needs the weight column-major (the layout
    `params.decode_layout` gives fp32 CPU weights), so that K-slices of W.T are contiguous.
    Eager inference only: under autograd or tracing the plain product is used."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or x.numel() > SPLIT_K_MAX_ROWS * x.shape[-1] or not w.t().is_contiguous()):
        return 1
    parts, k = torch.get_num_threads(), w.shape[1]
    while parts > 1 and k % parts:
        parts -= 1
    return parts


def _split_k_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, parts: int) -> torch.Tensor:
    """`x @ W.T + b` as the sum over `parts` K-slices, one batched matmul (one slice a thread)."""
    k, n = w.shape[1], w.shape[0]
    rows = x.reshape(-1, parts, k // parts).transpose(0, 1)  # [parts, M, K/parts]
    y = torch.bmm(rows, w.t().view(parts, k // parts, n)).sum(0)  # [M, N]
    if b is not None:
        y = y + b
    return y.view(*x.shape[:-1], n)


def norm(x: torch.Tensor, p: Params, cfg: ModelConfig) -> torch.Tensor:
    """Pre-norm of `[..., H]`: LayerNorm (weight, bias) or RMSNorm (weight; statistics in fp32)."""
    if cfg.norm == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), p["weight"], p.get("bias"), cfg.norm_eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return p["weight"] * x32.to(x.dtype)


def activation(x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """`cfg.activation` elementwise: tanh GELU, erf GELU, fast GELU (`x * sigmoid(1.702 x)`,
    MindSpore's FastGeLU, the default of mindformers' PanGu-α) or SiLU."""
    if cfg.activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if cfg.activation == "gelu":
        return F.gelu(x)
    if cfg.activation == "fast_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.silu(x)


def rope_tables(positions: torch.Tensor, cfg: ModelConfig, dtype: torch.dtype,
                start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, 1, T, D]` for integer `positions [B, T]` (non-interleaved halves, as LLaMA).
    Traced graphs compute them; eager calls gather rows of a table made once per
    (theta, D, context, device, dtype), which saves a dozen small ops per decode step. With
    `start` (every row's positions are `start .. start + T - 1`) they are a slice of the table,
    `[1, 1, T, D]`: views, no gather."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        cos, sin = _rope_from_positions(positions, cfg.rope_theta, cfg.head_dim)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    cos, sin = _rope_table(cfg.rope_theta, cfg.head_dim, cfg.max_seq_len, positions.device, dtype)
    if start is not None:
        T = positions.shape[1]
        return cos[None, None, start:start + T], sin[None, None, start:start + T]
    return cos[positions][:, None], sin[positions][:, None]


def _rope_from_positions(positions: torch.Tensor, theta: float, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    freqs = positions[..., None].float() * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=16)
def _rope_table(theta: float, d: int, max_len: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[max_len, D]` (computed in fp32 exactly as `_rope_from_positions`, then cast)."""
    with torch.inference_mode(False), torch.no_grad():
        cos, sin = _rope_from_positions(torch.arange(max_len, device=device), theta, d)
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, heads, T, D]` by the tables from `rope_tables`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# Up to this many queries (a decode step, a speculative verification) CPU attention in a reduced
# precision runs in fp32: 1.1-2x faster than torch's bf16 kernel at 1-8 queries over 40-250 keys.
FEW_QUERIES = 8


def attention(p: Params, cfg: ModelConfig, x: torch.Tensor, ctx: Context,
              kv: tuple[torch.Tensor, torch.Tensor] | None,
              query_input: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head / grouped-query attention of `x [B, T, H]` -> `[B, T, H]`.

    With `kv = (key_buf, value_buf)` (`[B, H_kv, S_max, D]`), the new keys and values are
    written **in place** at `ctx.positions` and attention reads the first `ctx.kv_len`
    positions. `query_input` (PanGu-α's query layer) replaces `x` as the source of queries."""
    B, T, _ = x.shape
    d = cfg.head_dim
    if "qkv" in p:  # fused (params.fuse_projections): q has cfg.num_heads heads, k and v the rest
        q_width = cfg.num_heads * d
        kv_width = (p["qkv"]["weight"].shape[0] - q_width) // 2
        q, k, v = linear(x, p["qkv"]).split([q_width, kv_width, kv_width], -1)
    else:
        q = linear(x if query_input is None else query_input, p["q"])
        k, v = linear(x, p["k"]), linear(x, p["v"])
    q, k, v = (t.view(B, T, -1, d).transpose(1, 2) for t in (q, k, v))
    if ctx.rope is not None:
        q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
    if kv is not None:
        key_buf, value_buf = kv
        if ctx.write_at is not None:  # every row at the same length: a plain slice copy
            key_buf[:, :, ctx.write_at:ctx.write_at + T] = k
            value_buf[:, :, ctx.write_at:ctx.write_at + T] = v
        else:
            index = ctx.positions[:, None, :, None].expand(B, k.shape[1], T, d)
            key_buf.scatter_(2, index, k)
            value_buf.scatter_(2, index, v)
        k, v = key_buf[:, :, : ctx.kv_len], value_buf[:, :, : ctx.kv_len]
    dtype = q.dtype
    # exported graphs keep a static shape's choice (one query) and never guard on a dynamic T
    few = T == 1 or (not torch.compiler.is_exporting() and T <= FEW_QUERIES)
    if few and q.device.type == "cpu" and dtype != torch.float32 and not torch.compiler.is_compiling():
        q, k, v = q.float(), k.float(), v.float()  # torch's bf16 CPU attention is up to 2x slower here
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.causal,
                                         enable_gqa=q.shape[1] != k.shape[1]).to(dtype)
    return linear(out.transpose(1, 2).reshape(B, T, -1), p["o"])


def mlp(p: Params, cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """GELU MLP (up -> act -> down) or SwiGLU (act(gate) * up -> down); `[B, T, H]` in and out."""
    if "gate_up" in p:  # fused (params.fuse_projections)
        gate, up = linear(x, p["gate_up"]).chunk(2, -1)
        return linear(activation(gate, cfg) * up, p["down"])
    if cfg.mlp == "swiglu":
        return linear(activation(linear(x, p["gate"]), cfg) * linear(x, p["up"]), p["down"])
    return linear(activation(linear(x, p["up"]), cfg), p["down"])


def block(p: Params, cfg: ModelConfig, x: torch.Tensor, ctx: Context,
          kv: tuple[torch.Tensor, torch.Tensor] | None,
          query_input: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm transformer block: `x + attn(norm(x))`, then `+ mlp(norm(.))`."""
    x = x + attention(p["attn"], cfg, norm(x, p["attn_norm"], cfg), ctx, kv, query_input)
    return x + mlp(p["mlp"], cfg, norm(x, p["mlp_norm"], cfg))


class Context:
    """What every block of one forward call shares: positions `[B, T]`, RoPE tables, and the
    attention mask over `kv_len` key positions (`mask` None and `causal` set when a plain
    causal or full mask is exact, which lets SDPA pick its fastest kernel). `write_at` is the
    common cache length when every row has the same one (eager only): new keys and values
    are then copied into a slice instead of scattered."""

    def __init__(self, positions: torch.Tensor, kv_len: int, mask: torch.Tensor | None,
                 causal: bool, rope: Any, write_at: int | None = None) -> None:
        self.positions, self.kv_len, self.mask, self.causal, self.rope = positions, kv_len, mask, causal, rope
        self.write_at = write_at
