"""ONNX lowering rules for the quantized-linear custom ops of `pangu_fn.quant`.

Under `torch.compiler.is_exporting()` a quantized leaf's `linear` calls
`torch.ops.pangu.int8_linear(x, qdata [N,K] int8, scales [N], bias?)` or
`torch.ops.pangu.int4_linear(x, qdata [N,K/G,G/2] uint8, scales [N,K/G], zero_points?, bias?,
group_size, in_features)`. These functions are the exporter's `custom_translation_table`
entries (called with onnx_ir Values inside onnxscript's recorder):

- int8 -> `DequantizeLinear(qdata^T [K,N], scales, axis=1)` + `MatMul` (+ `Add` bias), standard
  ONNX (allowed by ATC). Before opset 19 the scale must be float32, so fp16 / bf16 models cast
  the dequantized weight (the exporter folds the constant casts).
- int4, target ort -> `com.microsoft::MatMulNBits` (bits 4, block_size G; the packed data is
  already in its layout; zero points are re-packed two per byte, low nibble first).
- int4, target ascend (no contrib ops) -> unpacked uint8 `[N,K]` constant, `Cast` to float,
  `(q - zero) * scale` per group, `MatMul`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

MSFT = "com.microsoft"


def quant_ops() -> dict[str, Any]:
    """{"int8_linear": OpOverload, "int4_linear": OpOverload} for the ops that exist
    (importing `pangu_fn.quant` registers them); empty when quantization is not installed."""
    try:
        import pangu_fn.quant  # noqa: F401  (registers torch.ops.pangu.*)
    except ImportError:
        return {}
    found = {}
    for name in ("int8_linear", "int4_linear"):
        packet = getattr(getattr(torch.ops, "pangu", None), name, None)
        if packet is not None:
            found[name] = packet.default
    return found


def translation_table(opset: int, contrib_ops: bool, accuracy_level: int = 0) -> dict[Callable, Callable]:
    """The exporter's custom_translation_table for `opset`. `contrib_ops` False (Ascend) keeps
    every node in the standard domain; `accuracy_level` is MatMulNBits' attribute (0 = compute
    in the activation dtype, 4 = quantize activations to int8 per block: faster on CPU)."""
    import onnxscript

    op = onnxscript.values.Opset("", opset)
    msft = onnxscript.values.Opset(MSFT, 1)

    def int8_linear(x: ir.Value, qdata: ir.Value, scales: ir.Value, bias: ir.Value | None = None) -> ir.Value:
        w_t = op.Transpose(qdata, perm=[1, 0])  # [K, N], folded into the initializer
        if opset < 19 and scales.dtype != ir.DataType.FLOAT:
            w = op.DequantizeLinear(w_t, op.Cast(scales, to=ir.DataType.FLOAT), axis=1)
        else:
            w = op.DequantizeLinear(w_t, scales, axis=1)
        if w.dtype != x.dtype or opset < 19:
            w = op.CastLike(w, x)
        return _add_bias(op, op.MatMul(x, w), bias)

    def int4_linear(x: ir.Value, qdata: ir.Value, scales: ir.Value, zero_points: ir.Value | None = None,
                    bias: ir.Value | None = None, group_size: int = 32, in_features: int = 0) -> ir.Value:
        n, blocks = int(qdata.shape[0]), int(qdata.shape[1])
        if contrib_ops:
            zp = None
            if zero_points is not None:
                zp = op.Constant(value=ir.tensor(pack_nibbles(_const(zero_points, "zero_points")), name=None))
            scales_flat = op.CastLike(op.Reshape(scales, op.Constant(value_ints=[-1])), x)
            y = msft.MatMulNBits(x, qdata, scales_flat, zp, K=int(in_features), N=n, bits=4,
                                 block_size=int(group_size), accuracy_level=accuracy_level)
            return _add_bias(op, y, bias)
        q = unpack_nibbles(_const(qdata, "qdata"))[:, : blocks * group_size]  # [N, blocks * G]
        qf = op.CastLike(op.Constant(value=ir.tensor(q.reshape(n, blocks, group_size))), x)
        zero = (op.Unsqueeze(op.CastLike(zero_points, x), op.Constant(value_ints=[-1]))
                if zero_points is not None else op.CastLike(op.Constant(value_float=8.0), x))
        w = op.Mul(op.Sub(qf, zero), op.Unsqueeze(op.CastLike(scales, x), op.Constant(value_ints=[-1])))
        w = op.Reshape(w, op.Constant(value_ints=[n, blocks * group_size]))
        if blocks * group_size != in_features:
            w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[int(in_features)]),
                         op.Constant(value_ints=[1]))
        return _add_bias(op, op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)

    ops = quant_ops()
    table: dict[Callable, Callable] = {}
    if "int8_linear" in ops:
        table[ops["int8_linear"]] = int8_linear
    if "int4_linear" in ops:
        table[ops["int4_linear"]] = int4_linear
    return table


def _add_bias(op: Any, y: ir.Value, bias: ir.Value | None) -> ir.Value:
    return y if bias is None else op.Add(y, op.CastLike(bias, y))


def _const(value: ir.Value, what: str) -> np.ndarray:
    if value.const_value is None:
        raise ValueError(f"int4_linear lowering: expected {what} to be a constant initializer, "
                         f"found the computed value {value.name!r}")
    return value.const_value.numpy()


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 `[N, M]` -> `[N, ceil(M/2)]`, two per byte, low nibble first."""
    v = values.astype(np.uint8)
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], 1), np.uint8)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """`[N, ..., M/2]` uint8 -> `[N, M]` values 0..15 (low nibble first), flattened past dim 0."""
    p = packed.reshape(packed.shape[0], -1)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = p & 0x0F, p >> 4
    return out
