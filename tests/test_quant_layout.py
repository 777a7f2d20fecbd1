"""Bit layouts and rounding of the quantizers: nibble packing is an exact inverse pair, the CPU
kernel's packing inverts exactly, the int4 layout equals what onnxruntime's MatMulNBits
quantizer writes for the same weights, and dequantized weights are within half a step."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from pangu_fn.quant import quantize_int4, quantize_int8
from pangu_fn.quant.packing import (
    cpu_pack,
    cpu_unpack,
    from_matmul_nbits,
    pack_nibbles,
    to_matmul_nbits,
    unpack_nibbles,
)


def test_nibble_packing_is_an_exact_inverse_pair():
    every_byte = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_nibbles(unpack_nibbles(every_byte)), every_byte)
    codes = torch.randint(0, 16, (7, 4, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    assert pack_nibbles(torch.tensor([3, 12], dtype=torch.uint8)).item() == 3 | (12 << 4)  # low nibble first
    flat = codes.reshape(7, 128)
    assert torch.equal(from_matmul_nbits(to_matmul_nbits(flat, 32)), flat)


@pytest.mark.parametrize("n,k", [(16, 32), (64, 64), (176, 96), (784, 128)])
def test_cpu_kernel_packing_inverts_exactly(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    restored = cpu_unpack(cpu_pack(codes), n, k)
    if restored is None:
        pytest.skip("this machine's int4 CPU layout is not one cpu_unpack knows (the leaf keeps qdata)")
    assert torch.equal(restored, codes)


def ort_matmul_nbits(w: torch.Tensor, group_size: int, symmetric: bool) -> dict[str, np.ndarray]:
    """Quantize a one-MatMul ONNX model `Y = A @ W.T` with onnxruntime's MatMulNBitsQuantizer;
    returns its B / scales / zero_points initializers."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], "one_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w.t().contiguous().numpy(), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(copy.deepcopy(model), block_size=group_size, is_symmetric=symmetric)
    quantizer.process()
    nodes = quantizer.model.model.graph.node
    assert [x.op_type for x in nodes] == ["MatMulNBits"]
    inits = {t.name: numpy_helper.to_array(t) for t in quantizer.model.model.graph.initializer}
    by_input = dict(zip(["A", "B", "scales", "zero_points"], nodes[0].input))
    return {role: inits[name] for role, name in by_input.items() if name in inits}


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_layout_equals_onnxruntime_matmul_nbits_quantizer(group_size, symmetric):
    gen = torch.Generator().manual_seed(group_size + symmetric)
    w = torch.randn(48, 256, generator=gen)
    w[:, :group_size] += 1.5  # a group with no negative values: zero point 0 when asymmetric
    w[3] = 0.0  # an all-zero row: scale 0
    ours = quantize_int4(w, group_size, symmetric, torch.float32)
    ort = ort_matmul_nbits(w, group_size, symmetric)
    assert ort["B"].shape == tuple(ours.qdata.shape) == (48, 256 // group_size, group_size // 2)
    np.testing.assert_array_equal(ours.qdata.numpy(), ort["B"])
    np.testing.assert_array_equal(ours.scales.numpy().reshape(-1), ort["scales"].reshape(-1))
    if symmetric:
        assert ours.zero_points is None and "zero_points" not in ort
    else:  # ORT packs zero points two per byte along the blocks, low nibble first
        packed = ort["zero_points"].reshape(48, -1)
        unpacked = unpack_nibbles(torch.from_numpy(packed.copy()))[:, : 256 // group_size]
        assert torch.equal(ours.zero_points, unpacked)


def _steps(w: torch.Tensor, deq: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """|w - deq| in units of each element's quantization step."""
    return (w - deq).abs() / step.abs().clamp(min=torch.finfo(torch.float32).tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequantizes_within_half_a_step(dtype):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * torch.rand(64, 1) * 3
    leaf = quantize_int8(w, dtype)
    step = leaf.scales.float()[:, None].expand_as(w)
    assert _steps(w, leaf.dequantize(torch.float32), step).max() <= 0.5 + 1e-5
    assert leaf.qdata.abs().max() <= 127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_asymmetric_dequantizes_within_half_a_step(dtype, group_size):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    leaf = quantize_int4(w, group_size, False, dtype)
    step = leaf.scales.float().repeat_interleave(group_size, dim=1)
    assert _steps(w, leaf.dequantize(torch.float32), step).max() <= 0.5 + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_symmetric_bound_half_a_step_except_the_clamped_top_code(dtype):
    """Symmetric int4 maps the group's largest-magnitude value m to code 0 (-8 steps); a value
    of the other sign beyond 7.5 steps clamps to code 15 (+7 steps): within one step."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(3))
    leaf = quantize_int4(w, 32, True, dtype)
    step = leaf.scales.float().repeat_interleave(32, dim=1)
    err = _steps(w, leaf.dequantize(torch.float32), step)
    clamped = (w / step).round() + 8 > 15
    assert err[~clamped].max() <= 0.5 + 1e-5
    assert clamped.any() and err[clamped].max() <= 1.0 + 1e-5
