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
- int4, target ascend (no contrib ops) -> codes unpacked with `Mod` / `Div` by 16, `Cast` to
  float, `(code - zero) * scale` per group, `MatMul` (the optimizer folds what is constant).

Also here: `x >> n`, whose stock lowering is wrong for uint8 (see `right_shift`).

Buffers are still graph inputs while these run (initializers are attached afterwards), so
every step on the weights is written as graph ops rather than computed in numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
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
    matmul_nbits = onnxscript.values.Op(onnxscript.values.Opset(MSFT, 1), "MatMulNBits", _matmul_nbits_schema())

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
            zp = None if zero_points is None else pack_zero_points(zero_points, n, blocks)
            scales_flat = op.CastLike(op.Reshape(scales, op.Constant(value_ints=[-1])), x)
            y = matmul_nbits(x, qdata, scales_flat, zp, K=int(in_features), N=n, bits=4,
                                 block_size=int(group_size), accuracy_level=accuracy_level)
            return _add_bias(op, y, bias)
        sixteen = op.Constant(value=ir.tensor(np.array(16, np.uint8)))
        codes = op.Concat(op.Unsqueeze(op.Mod(qdata, sixteen), op.Constant(value_ints=[-1])),
                          op.Unsqueeze(op.Div(qdata, sixteen), op.Constant(value_ints=[-1])), axis=-1)
        qf = op.CastLike(op.Reshape(codes, op.Constant(value_ints=[n, blocks, group_size])), x)
        zero = (op.Unsqueeze(op.CastLike(zero_points, x), op.Constant(value_ints=[-1]))
                if zero_points is not None else op.CastLike(op.Constant(value_float=8.0), x))
        w = op.Mul(op.Sub(qf, zero), op.Unsqueeze(op.CastLike(scales, x), op.Constant(value_ints=[-1])))
        w = op.Reshape(w, op.Constant(value_ints=[n, blocks * group_size]))
        if blocks * group_size != in_features:
            w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[int(in_features)]),
                         op.Constant(value_ints=[1]), op.Constant(value_ints=[1]))
        return _add_bias(op, op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)

    def pack_zero_points(zero_points: ir.Value, n: int, blocks: int) -> ir.Value:
        """uint8 `[N, blocks]` values 0..15 -> `[N, ceil(blocks/2)]`, two per byte, low nibble
        first (graph ops on the constant; the exporter's optimizer folds them)."""
        zp = zero_points
        if blocks % 2:
            zp = op.Pad(zp, op.Constant(value_ints=[0, 0, 0, 1]))
        pairs = op.Reshape(zp, op.Constant(value_ints=[n, (blocks + 1) // 2, 2]))
        low = op.Gather(pairs, op.Constant(value_int=0), axis=2)
        high = op.Gather(pairs, op.Constant(value_int=1), axis=2)
        return op.Add(low, op.Mul(high, op.Constant(value=ir.tensor(np.array(16, np.uint8)))))

    unsigned = (ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64)

    def right_shift(x: ir.Value, shift: Any) -> ir.Value:
        """`x >> shift`. The stock lowering casts uint8 through INT8 (wrong for codes >= 128
        and a Cast ATC rejects); unsigned inputs (the int4 codes an int4 embedding unpacks)
        take ONNX BitShift, signed ones floor division by 2**shift."""
        amount = shift if isinstance(shift, ir.Value) else op.Constant(value_int=int(shift))
        if x.dtype in unsigned:
            return op.BitShift(x, op.CastLike(amount, x), direction="RIGHT")
        power = op.CastLike(op.Pow(op.Constant(value_int=2), op.Cast(amount, to=ir.DataType.INT64)), x)
        one = op.CastLike(op.Constant(value_int=1), x)
        negative = op.Sub(op.Div(op.Add(x, one), power), one)  # floor for x < 0, no overflow at the minimum
        return op.Where(op.Less(x, op.CastLike(op.Constant(value_int=0), x)), negative, op.Div(x, power))

    ops = quant_ops()
    shifts = (torch.ops.aten.__rshift__.Scalar, torch.ops.aten.__rshift__.Tensor,
              torch.ops.aten.bitwise_right_shift.Tensor_Scalar, torch.ops.aten.bitwise_right_shift.Tensor)
    table: dict[Callable, Callable] = dict.fromkeys(shifts, right_shift)
    if "int8_linear" in ops:
        table[ops["int8_linear"]] = int8_linear
    if "int4_linear" in ops:
        table[ops["int4_linear"]] = int4_linear
    return table


def _add_bias(op: Any, y: ir.Value, bias: ir.Value | None) -> ir.Value:
    return y if bias is None else op.Add(y, op.CastLike(bias, y))


def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """The signature of com.microsoft::MatMulNBits (ONNX Runtime contrib op, domain version 1)
    as far as we use it: A, B, scales, zero_points; attributes K, N, bits, block_size,
    accuracy_level."""
    P, A = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.Attribute
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    ints = onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "MatMulNBits", MSFT, 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=optional)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", floats, "activations"), ("T2", ["tensor(uint8)"], "packed weights"),
                          ("T3", ["tensor(uint8)", *floats], "zero points")],
        attributes=[A("K", ints, "input features"), A("N", ints, "output features"), A("bits", ints, "bits"),
                    A("block_size", ints, "group size"), A("accuracy_level", ints, "compute precision")])
