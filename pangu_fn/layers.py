"""The building blocks of all three families, as functions of (params, config, activations).

Shapes: B batch, T new tokens, S attended positions, H hidden, D head_dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import backend
from .config import ModelConfig
from .params import Params


def linear(x: torch.Tensor, p: Params) -> torch.Tensor:
    """`x @ W.T + b` for `p = {"weight": W [out, in], "bias"?: [out]}`. A weight that is not a
    tensor is a quantized (or sharded) leaf and brings its own kernel: `W.linear(x, bias)`."""
    w, b = p["weight"], p.get("bias")
    if not isinstance(w, torch.Tensor):
        return w.linear(x, b)
    return backend.dense_linear(x, w, b)


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
    """cos, sin `[B, 1, T, D]` for integer `positions [B, T]` (`[1, 1, T, D]` when every row's
    positions are `start .. start + T - 1`); see `backend.rope_tables`."""
    return backend.rope_tables(positions, cfg.rope_theta, cfg.head_dim, cfg.max_seq_len, dtype, start)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, heads, T, D]` by the tables from `rope_tables`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
        backend.write_kv(key_buf, k, ctx.positions, ctx.write_at)
        backend.write_kv(value_buf, v, ctx.positions, ctx.write_at)
        k, v = key_buf[:, :, : ctx.kv_len], value_buf[:, :, : ctx.kv_len]
    out = backend.attention(q, k, v, ctx.mask, ctx.causal)
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
