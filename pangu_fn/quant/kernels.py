"""Kernel choice for the quantized matmuls, per device (rule 5: backends are leaves).

| where | int8 leaf | int4 leaf | dense bf16 leaf |
|---|---|---|---|
| exporting | `torch.ops.pangu.int8_linear` | `torch.ops.pangu.int4_linear` | `F.linear` |
| CPU, bf16 activations, few rows | `native.int8_linear`, else `torch._weight_int8pack_mm` | `native.int4_linear`, else `torch._weight_int4pack_mm_for_cpu` | `native.bf16_linear`, else oneDNN prepacked matmul |
| CPU with the AVX2 build, bf16 or fp32 activations, fewer than `AVX2_NATIVE_ROWS` (64) rows | `native.int8_linear` | `native.int4_linear` | `native.bf16_linear` (bf16) |
| CPU, bf16, many rows (`DEQUANTIZE_ROWS`, `NATIVE_INT4_ROWS`, `native.BF16_MAX_ELEMENTS`) | dequantize, then bf16 `F.linear` (fp32 where oneDNN has no bf16 path: `backend.matmul_dtype`) | the same (`native.int4_dequantize`) | `F.linear` (the same), or oneDNN prepacked matmul |
| CUDA, bf16 activations, few rows (`DEQUANTIZE_ROWS`) | dequantize, then `F.linear` (torch's CUDA `_weight_int8pack_mm` was no faster) | `torch._weight_int4pack_mm` (tinygemm; packed once per leaf) | `F.linear` |
| Ascend (`torch_npu`) | `npu_weight_quant_batchmatmul` | the same, int4 packed by `npu_convert_weight_to_int4pack` | `F.linear` |
| anything else | dequantize, then `F.linear` | dequantize, then `F.linear` | `F.linear` |

`native.*` are the AVX-512 or AVX2 kernels compiled on first use (`native.py`); where they cannot
run, a dense bf16 leaf holds oneDNN's prepacked copy and an int4 leaf torch's CPU pack instead.
Compiled graphs call them as the custom ops of `backend.py` (an int4 leaf with native data at
any row count: tracing the torch dequantize would break the graph).
The CUDA paths were run on an H100 (tests/test_accelerator.py); the Ascend path follows
torch_npu's documented signature and has not been run (no NPU here).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from .. import backend, native
from ..backend import tracing
from ..errors import InputError

# From this many rows of activations on (prefill, scoring), dequantizing the weight once and
# running a bf16 matmul beats the weight-only kernels, whose time grows with every row
# (3072x768, one thread, 128 rows: int8 kernel 8.0 ms vs 3.6 ms; int4 kernel 7.0 vs 5.2 ms).
DEQUANTIZE_ROWS = {"int8": 32, "int4": 128}
# The native int4 kernel makes one pass over the weight per 8 rows; from 32 rows on, the native
# dequantize and a bf16 matmul are faster (768 x 3072, two threads, 32 rows: 0.90 vs 0.74 ms).
NATIVE_INT4_ROWS = 32
# With the AVX2 kernels (weights read once per call at any row count) up to this many rows: int4
# at 2304 x 768, one thread, busy machine: 32 rows 23 vs 46 ms dequantized, 64 rows 46 vs 40;
# int8 32 rows 23 vs 23, 64 rows 22 vs 25, 128 rows 59 vs 52.
AVX2_NATIVE_ROWS = 64
DEQUANTIZE_CHUNK = 4096  # weight rows dequantized at once (a multiple of the int4 PACK_ROWS)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


def check_input(kind: str, w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise InputError unless `x` is `[..., K]` and `bias` None or `[N]` for the leaf `w [N, K]`
    (as `F.linear` would raise; the native kernels would read past the weight)."""
    n, k = w.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise InputError(f"{kind} linear: input {list(x.shape)} does not fit weight [{n}, {k}] "
                         f"(expected [..., {k}])")
    if bias is not None and tuple(bias.shape) != (n,):
        raise InputError(f"{kind} linear: expected bias [{n}] for weight [{n}, {k}], found bias {list(bias.shape)}")


def npu_available(x: torch.Tensor) -> bool:
    return x.device.type == "npu" and importlib.util.find_spec("torch_npu") is not None


def int8_linear(w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x [..., K] -> [..., N]` through the int8 leaf `w` (InputError for another width)."""
    check_input("int8", w, x, bias)
    n, k = w.shape
    if torch.compiler.is_exporting():
        return torch.ops.pangu.int8_linear(x, w.qdata, w.scales, bias)
    rows = AVX2_NATIVE_ROWS if backend.native_avx2() else DEQUANTIZE_ROWS["int8"]
    if x.device.type == "cpu" and x.numel() < rows * k and (
            backend.native_int8_fits(x, w.scales) or (x.dtype == torch.bfloat16 == w.scales.dtype and k % 16 == 0)):
        # torch's kernel (bf16 only) crashes on K % 16 != 0
        return backend.int8_linear(_rows(x), w.qdata, w.scales, bias).view(*x.shape[:-1], n)
    if npu_available(x) and x.dtype in (torch.float16, torch.bfloat16):
        return _npu_linear(w, x, bias)
    if torch.compiler.is_compiling() and x.device.type == "cuda":  # inductor fuses the int8 -> bf16 cast into the matmul
        return _add_bias(F.linear(x, w.qdata.to(x.dtype)) * w.scales.to(x.dtype), bias)
    return dequantized_linear(w, x, bias)


def int4_linear(w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x [..., K] -> [..., N]` through the int4 leaf `w` (InputError for another width)."""
    check_input("int4", w, x, bias)
    n, k = w.shape
    if torch.compiler.is_exporting():
        return torch.ops.pangu.int4_linear(x, w.qdata, w.scales, w.zero_points, bias, w.group_size, k)
    bf16_cpu = x.device.type == "cpu" and x.dtype == torch.bfloat16
    if (x.device.type == "cpu" and x.dtype == w.compute_dtype and w.native_kernel_data is not None
            and (x.numel() < (AVX2_NATIVE_ROWS if backend.native_avx2() else NATIVE_INT4_ROWS) * k
                 or torch.compiler.is_compiling())):  # (the op takes any rows)
        y = backend.int4_linear(_rows(x), *w.native_kernel_data, w.group_size, bias)
        if y is not None:
            return y.view(*x.shape[:-1], n)
    cpu = w.cpu_kernel_data
    if bf16_cpu and x.numel() < DEQUANTIZE_ROWS["int4"] * k and cpu is not None:
        packed, scales_and_zeros = cpu
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_rows(x), packed, w.group_size, scales_and_zeros)
        if y.shape[-1] != n:  # rows padded to a multiple of 16 for the packer
            y = y[:, :n]
        return _add_bias(y, bias).view(*x.shape[:-1], n)
    # compiled programs read the pack `compiled.programs` built beforehand (not traced)
    if (x.device.type == "cuda" and x.dtype == torch.bfloat16 and x.numel() < DEQUANTIZE_ROWS["int4"] * k
            and w.cuda_kernel_data is not None):
        packed, scales_and_zeros = w.cuda_kernel_data
        y = torch._weight_int4pack_mm(_rows(x), packed, w.group_size, scales_and_zeros)
        return _add_bias(y, bias).view(*x.shape[:-1], n)
    if npu_available(x) and x.dtype in (torch.float16, torch.bfloat16):
        return _npu_linear(w, x, bias)
    return dequantized_linear(w, x, bias)


def dequantized_linear(w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` with the weight dequantized to x's dtype, `DEQUANTIZE_CHUNK` output rows at a
    time, so that no more than that many rows of float weight exist at once (a quantized
    50257-row head would otherwise briefly need its full bf16 copy)."""
    n, dtype = w.shape[0], backend.matmul_dtype(x)  # fp32 where the CPU's bf16 matmul is slow
    if n <= DEQUANTIZE_CHUNK:
        return backend.linear_in(dtype, x, w.dequantize(dtype), bias)
    parts = [backend.linear_in(dtype, x, w.dequantize(dtype, slice(r0, min(r0 + DEQUANTIZE_CHUNK, n))),
                               None if bias is None else bias[r0:r0 + DEQUANTIZE_CHUNK])
             for r0 in range(0, n, DEQUANTIZE_CHUNK)]
    return torch.cat(parts, dim=-1)


def dense_linear(w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x [..., K] -> [..., N]` through a dense leaf (on the CPU, few bf16 rows: the native
    kernel, else the prepacked oneDNN weight; InputError for another width)."""
    check_input(w.scheme, w, x, bias)
    if w.packed is None:
        y = native.dense_bf16_linear(x, w.weight, bias)
        if y is not None:
            return y
    packed = w.packed
    if packed is not None and x.dtype == packed.dtype and x.device.type == "cpu" and not tracing():
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return backend.linear_in(backend.matmul_dtype(x), x, w.weight, bias)


def mkldnn_prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a bf16 CPU weight `[N, K]` (AMX / AVX-512 BF16 kernels), or
    None where oneDNN or its bf16 path is missing (a CPU without AVX-512BW/VL/DQ or AVX-NE-CONVERT),
    the weight is not a bf16 CPU tensor, or the native bf16 kernel multiplies the plain weight."""
    if (weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or tracing()
            or not _mkldnn_bf16() or native.bf16_fits(weight.shape[1])):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


@functools.cache
def _mkldnn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _npu_linear(w: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch_npu's weight-only quantized matmul. NPU dequantization is `(q + offset) * scale`
    with signed codes, so int4 codes c (0..15, zero z) become q = c - 8 and offset = 8 - z."""
    import torch_npu

    n, _ = w.shape
    weight, scale, offset, group = w.npu_kernel_data(x.dtype)
    y = torch_npu.npu_weight_quant_batchmatmul(_rows(x), weight, scale, antiquant_offset=offset,
                                               bias=bias, antiquant_group_size=group)
    return y.view(*x.shape[:-1], n)


def npu_int8_data(w: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, None, int]:
    """(weight int8 [K, N], scale [N], no offset, group 0) for `npu_weight_quant_batchmatmul`."""
    return w.qdata.t().contiguous(), w.scales.to(dtype), None, 0


def scales_and_zeros(scales: torch.Tensor, zero_points: torch.Tensor | None, pad: int = 0) -> torch.Tensor:
    """`[K/G, N + pad, 2]` bf16 for torch's int4 kernels (CPU and CUDA), from `scales [N, K/G]`
    and zero points (None: 8). They compute (code - 8) * scale + zero, so zero = (8 - zero
    point) * scale; `pad` zero columns follow (rows the CPU packer pads)."""
    scales = scales.float()
    zero = 8.0 if zero_points is None else zero_points.float()
    sz = torch.stack([scales.t(), ((8.0 - zero) * scales).t()], dim=-1)
    if pad:
        sz = torch.cat([sz, sz.new_zeros(sz.shape[0], pad, 2)], 1)
    return sz.to(torch.bfloat16).contiguous()


def cuda_int4_data(w: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed weight, `scales_and_zeros`) for `torch._weight_int4pack_mm`, or None where
    tinygemm does not take the shape (N % 8, K % 32, G in 32..256). Its input is uint8
    `[N, K/2]` with the even column in the high nibble."""
    n, k = w.shape
    if n % 8 or k % 32 or w.group_size not in (32, 64, 128, 256) or w.scales.dtype != torch.bfloat16:
        return None
    codes = w.codes()
    packed = torch._convert_weight_to_int4pack((codes[:, 0::2] << 4) | codes[:, 1::2],
                                               next(t for t in (8, 4, 2) if k % (16 * t) == 0))
    return packed, scales_and_zeros(w.scales, w.zero_points)


def npu_int4_data(w: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(int4 weight packed in int32 [K, N/8], scale [K/G, N], offset [K/G, N], group G)."""
    import torch_npu

    codes = w.codes().to(torch.int32) - 8  # [N, K], signed int4
    weight = torch_npu.npu_convert_weight_to_int4pack(codes.t().contiguous())
    zero = torch.full_like(w.scales, 8.0) if w.zero_points is None else w.zero_points.to(w.scales.dtype)
    offset = (8.0 - zero).t().contiguous().to(dtype)
    return weight, w.scales.t().contiguous().to(dtype), offset, w.group_size
