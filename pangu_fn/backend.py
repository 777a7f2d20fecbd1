"""Kernel choice for the dense model: which implementation computes each piece of math.

`layers.py` and `model.py` state the math; this module picks how it runs. Traced programs
(`torch.compile`, `torch.export`, the ONNX exporter) always get the plain PyTorch op, which the
compiler fuses or lowers; eager inference gets the choices measured faster on each device:

| piece | eager (CPU) | traced |
|---|---|---|
| every block of a step of <= `native_step.MAX_ROWS` rows with a cache (AVX2 + FMA CPUs) | one native call, `native_step.fused_blocks` | the blocks' own ops |
| dense bf16 linear, few rows | `native.bf16_linear` (AVX-512 or AVX2 build) | compiled: `pangu_backend::bf16_linear`; exported: `F.linear` |
| int8 / int4 leaf, few rows | `native.int8_linear` / `native.int4_linear` (bf16 activations; AVX2: bf16 or fp32) | compiled: `pangu_backend::int8_linear` / `int4_linear` |
| dense fp32 linear, few rows | row-major weight: `native.f32_linear` (AVX2 library); column-major: split-K batched matmul (one K-slice a thread) | `F.linear` |
| bf16 linear, many rows, CPU without oneDNN's bf16 path (AVX2) | `F.linear` in fp32, rounded once to bf16 (`matmul_dtype`) | `F.linear` |
| attention, <= `FEW_QUERIES` queries in a reduced precision | SDPA in fp32 | SDPA in the dtype |
| cache write, every row at one length | slice copy | scatter at the positions |
| RoPE cos / sin | rows of a table made once | computed from the positions |

Quantized leaves choose their own kernels beside their type (`quant/kernels.py`), under the same
`tracing()` predicate. Tracing is the only switch: eager and compiled programs share every line
of `layers.py` / `model.py`.

The activations' dtype is the tree's (a quantized tree's `QuantRecipe.compute_dtype`, bf16 by
default) on every CPU. On AVX2 CPUs (no AVX-512) an fp32 quantized tree was measured against
the default: GPT-2-small, one thread, busy machine, int8 with its head kept: bf16 27.7 vs fp32
19.7 tok/s (the kept head is twice the bytes in fp32); head in int8: 23.8 vs 23.0, int4 18.0 vs
19.6. No clear win, so bf16 stays the default there too.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from . import native, native_step

# Up to this many rows a CPU fp32 product is split over K (see `_split_k_parts`).
SPLIT_K_MAX_ROWS = 8
# Up to this many queries (a decode step, a speculative verification) CPU attention in a reduced
# precision runs in fp32: 1.1-2x faster than torch's bf16 kernel at 1-8 queries over 40-250 keys.
FEW_QUERIES = 8


def tracing() -> bool:
    """True while torch.compile (dynamo) or torch.export traces the model: kernel choices then
    fall back to plain PyTorch ops, and eager-only checks (`.tolist()` of lengths, token
    range checks) are skipped."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`x [..., K] @ w [N, K].T + b [N]`: the native bf16 kernel or split-K where they are faster
    (compiled CPU graphs call the native bf16 kernel as the custom op `pangu_backend::bf16_linear`;
    exported graphs hold `F.linear`)."""
    if torch.compiler.is_exporting():
        return F.linear(x, w, b)
    if torch.compiler.is_compiling():
        if _native_bf16_fits(x, w):
            y = torch.ops.pangu_backend.bf16_linear(x.reshape(-1, x.shape[-1]).contiguous(), w, b)
            return y.view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, b)
    if w.dtype == torch.bfloat16:
        y = native.dense_bf16_linear(x, w, b)
        if y is not None:
            return y
    if _native_f32_fits(x, w):
        y = native.f32_linear(x.reshape(-1, x.shape[-1]).contiguous(), w, b)
        if y is not None:
            return y.view(*x.shape[:-1], w.shape[0])
    parts = _split_k_parts(x, w)
    if parts > 1:
        return _split_k_linear(x, w, b, parts)
    return linear_in(matmul_dtype(x), x, w, b)


def fused_blocks(params: Any, cfg: Any, x: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor | None:
    """The final hidden states of `model.blocks` for embedded tokens `x [B, T, H]` at
    `positions [B, T]` from one native call where it runs (eager CPU steps of few rows; see
    `native_step`), writing the cache in place; None: run `model.blocks`."""
    return native_step.fused_blocks(params, cfg, x, positions, cache)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an eager product with activations `x` runs in: fp32 for bf16 on a CPU where
    oneDNN has no bf16 path (no AVX-512BW/VL/DQ or AVX-NE-CONVERT, e.g. AMD Zen 3), where torch's
    bf16 matmul is 2-10x slower than casting both sides to fp32 (one thread, 64 rows: 256 x 256
    0.69 vs 0.13 ms, 2304 x 768 22 vs 7 ms); else x's dtype."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not tracing() and _slow_bf16_matmul():
        return torch.float32
    return x.dtype


def linear_in(dtype: torch.dtype, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` computed in `dtype` (a `matmul_dtype`), returned in x's dtype."""
    if dtype == x.dtype:
        return F.linear(x, w, b)
    return F.linear(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)).to(x.dtype)


@functools.cache
def _slow_bf16_matmul() -> bool:
    return not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _native_f32_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Few fp32 rows against a row-major fp32 CPU weight, eager inference: `native.f32_linear`."""
    return (x.dtype == torch.float32 == w.dtype and x.device.type == "cpu" == w.device.type and w.is_contiguous()
            and x.numel() <= SPLIT_K_MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled() and native.f32_kernels())


def _split_k_parts(x: torch.Tensor, w: torch.Tensor) -> int:
    """How many threads share a few-row fp32 product on the CPU (1 = use F.linear).

    torch's CPU matrix-vector product runs on one thread (about 20 GB/s of weights here), while
    a batched product over K-slices runs one slice per thread: 1.7x faster on GPT-2-small's
    blocks and 2x on its LM head at 2 threads. It needs the weight column-major (the layout
    `params.decode_layout` gives fp32 CPU weights), so that K-slices of W.T are contiguous.
    Inference only: under autograd the plain product is used."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32
            or torch.is_grad_enabled() or x.numel() > SPLIT_K_MAX_ROWS * x.shape[-1]
            or not w.t().is_contiguous()):
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
    """SDPA of `q [B, Hq, T, D]` over `k, v [B, Hkv, S, D]` (grouped when Hq > Hkv), in q's dtype.
    Few CPU queries in a reduced precision run in fp32 eagerly (torch's bf16 CPU attention is up
    to 2x slower there); exported graphs keep a static shape's choice (one query) and never
    guard on a dynamic T; compiled graphs stay in the dtype."""
    dtype, T = q.dtype, q.shape[2]
    few = T == 1 or (not torch.compiler.is_exporting() and T <= FEW_QUERIES)
    if few and q.device.type == "cpu" and dtype != torch.float32 and not torch.compiler.is_compiling():
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.to(dtype)


def write_kv(buf: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, write_at: int | None) -> None:
    """Write `new [B, H, T, D]` into the cache buffer `buf [B, H, S, D]` **in place** at
    `positions [B, T]`: a slice copy at `write_at` when every row shares that start, else a
    scatter (the only form a traced program uses: positions are a tensor there)."""
    if write_at is not None:
        buf[:, :, write_at:write_at + new.shape[2]] = new
        return
    B, H, T, D = new.shape
    buf.scatter_(2, positions[:, None, :, None].expand(B, H, T, D), new)


def rope_tables(positions: torch.Tensor, theta: float, d: int, max_len: int, dtype: torch.dtype,
                start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, 1, T, D]` for integer `positions [B, T]`. Traced programs compute them;
    eager calls gather rows of a table made once per (theta, D, max_len, device, dtype), which
    saves a dozen small ops per decode step. With `start` (every row's positions are
    `start .. start + T - 1`) they are views of the table, `[1, 1, T, D]`."""
    if tracing():
        cos, sin = rope_from_positions(positions, theta, d)
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]
    cos, sin = _rope_table(theta, d, max_len, positions.device, dtype)
    if start is not None:
        T = positions.shape[1]
        return cos[None, None, start:start + T], sin[None, None, start:start + T]
    return cos[positions][:, None], sin[positions][:, None]


def rope_from_positions(positions: torch.Tensor, theta: float, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[..., D]` (fp32) of `positions [...]`: non-interleaved halves, as LLaMA."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
    freqs = positions[..., None].float() * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@functools.lru_cache(maxsize=16)
def _rope_table(theta: float, d: int, max_len: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[max_len, D]` (computed in fp32 exactly as `rope_from_positions`, then cast)."""
    with torch.inference_mode(False), torch.no_grad():
        cos, sin = rope_from_positions(torch.arange(max_len, device=device), theta, d)
    return cos.to(dtype), sin.to(dtype)


# The native kernels are ctypes calls, which torch.compile cannot trace: as custom ops a compiled
# graph calls them like any aten op (opaque to inductor, same arithmetic as eager).
# torch.library infers the schemas from these hints; Optional[Tensor] is its spelling.
# ruff: noqa: UP045


@torch.compiler.assume_constant_result
def _native_bf16_available() -> bool:
    return native.bf16_kernels()


def _native_bf16_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Where eager inference would take `native.dense_bf16_linear` (shapes are static when compiled)."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and x.shape[-1] % 32 == 0
            and x.numel() <= native.BF16_MAX_ELEMENTS and not torch.is_grad_enabled() and _native_bf16_available())


@torch.library.custom_op("pangu_backend::bf16_linear", mutates_args=())
def _bf16_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`x [M, K] @ weight [N, K].T + bias` by `native.bf16_linear`, else `F.linear`."""
    y = native.bf16_linear(x, weight, bias)
    return F.linear(x, weight, bias) if y is None else y


@_bf16_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.compiler.assume_constant_result
def native_avx2() -> bool:
    """`native.avx2()`, a constant to compiled graphs."""
    return native.avx2()


def native_int8_fits(x: torch.Tensor, scales: torch.Tensor) -> bool:
    """Where `native.int8_linear` takes x's and the scales' dtypes and width (K % 32, K <=
    `native.MAX_K`): bf16 both with the AVX-512 kernels, bf16 or fp32 with the AVX2 ones."""
    k = x.shape[-1]
    if k % 32 or k > native.MAX_K or x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16 == scales.dtype and _native_bf16_available():
        return True
    return x.dtype in native.FLOATS and scales.dtype in native.FLOATS and native_avx2()


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x [M, K] @ (qdata [N, K] * scales[:, None]).T + bias` in x's dtype (CPU, contiguous):
    the native kernel, else `torch._weight_int8pack_mm` (bf16), else the dequantized weight;
    in compiled graphs the custom op `pangu_backend::int8_linear` doing the same."""
    if torch.compiler.is_compiling():
        return torch.ops.pangu_backend.int8_linear(x, qdata, scales, bias)
    return _int8_linear_eager(x, qdata, scales, bias)


def _int8_linear_eager(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    y = native.int8_linear(x, qdata, scales, bias)
    if y is not None:
        return y
    if x.dtype == torch.bfloat16 == scales.dtype and x.shape[-1] % 16 == 0:
        y = torch._weight_int8pack_mm(x, qdata, scales)
        return y if bias is None else y.add_(bias)
    return F.linear(x, qdata.to(x.dtype) * scales.to(x.dtype)[:, None], bias)


@torch.library.custom_op("pangu_backend::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _int8_linear_eager(x, qdata, scales, bias)


@_int8_linear_op.register_fake
def _(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((x.shape[0], qdata.shape[0]))


def int4_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`native.int4_linear` (`x [M, K]` CPU; None where it does not run); in compiled graphs
    the custom op `pangu_backend::int4_linear` (never None: the weight dequantized (natively
    where it can be) and `F.linear` where the kernel does not run)."""
    if torch.compiler.is_compiling():
        return torch.ops.pangu_backend.int4_linear(x, qdata, scales, zero_points, group_size, bias)
    return native.int4_linear(x, qdata, scales, zero_points, group_size, bias)


@torch.library.custom_op("pangu_backend::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
                    group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = native.int4_linear(x, qdata, scales, zero_points, group_size, bias)
    if y is None:
        w = native.int4_dequantize(qdata, scales, zero_points, group_size)
        if w is None:
            from .quant.packing import int4_codes
            from .quant.rtn import int4_dequantize

            w = int4_dequantize(int4_codes(qdata, scales.shape[0]), scales, zero_points, x.dtype)
        y = F.linear(x, w.to(x.dtype), bias)
    return y


@_int4_linear_op.register_fake
def _(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: Optional[torch.Tensor],
      group_size: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x.new_empty((x.shape[0], scales.shape[0]))
