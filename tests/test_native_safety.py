"""Every entry into the native kernels checks its arguments in Python first: a wrong width,
dtype, layout or side tensor raises `InputError` naming the shapes (where `F.linear` raises
too), whether or not the compiled library runs on this machine; valid arguments give the
dequantize-then-matmul numbers or None (kernel unavailable)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pangu_fn.layers
from pangu_fn import native
from pangu_fn.errors import InputError
from pangu_fn.quant import DenseWeight, Int4Weight, Int8Weight
from pangu_fn.quant.packing import pack_nibbles, to_tiles, unpack_nibbles

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bf16(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def int4_parts(n: int, k: int, g: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MatMulNBits bytes [N, K/G, G/2], bf16 scales and uint8 zero points [N, K/G]."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // g, g), generator=gen, dtype=torch.uint8)
    scales = (0.1 * torch.rand(n, k // g, generator=gen) + 0.01).bfloat16()
    zeros = torch.randint(0, 16, (n, k // g), generator=gen, dtype=torch.uint8)
    return pack_nibbles(codes).contiguous(), scales, zeros


def int4_weight(qdata: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, g: int) -> torch.Tensor:
    """The fp32 weight [N, K] of int4 parts, computed here from the layout's definition."""
    n = scales.shape[0]
    low, high = (qdata & 15).float(), (qdata >> 4).float()
    codes = torch.stack([low, high], dim=-1).reshape(n, -1, g)
    zero = 8.0 if zeros is None else zeros.float()[..., None]
    return ((codes - zero) * scales.float()[..., None]).reshape(n, -1)


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within a bf16 rounding (checked at 2^-8) plus fp32 summation-order error."""
    return bool(((y.float() - ref).abs() <= 2**-8 * ref.abs() + 1e-4 * ref.abs().max() + 1e-6).all())


def test_the_issue_examples_raise_as_f_linear_does():
    q = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    x, w = bf16(1, 128), bf16(64, 64)
    with pytest.raises(RuntimeError):
        F.linear(x, w)
    with pytest.raises(InputError, match=r"\[1, 128\].*\[64, 64\]"):
        Int8Weight(q, bf16(64)).linear(x)
    with pytest.raises(InputError, match=r"\[1, 128\].*\[64, 64\]"):
        native.bf16_linear(x, w, None)
    with pytest.raises(InputError, match=r"\[1, 128\].*\[64, 64\]"):
        native.int8_linear(x, q, bf16(64))


@pytest.mark.parametrize("width", [32, 128])
def test_every_leaf_and_a_plain_bf16_weight_reject_the_wrong_width(width):
    qdata, scales, zeros = int4_parts(64, 64, 32)
    leaves = [Int8Weight(torch.zeros(64, 64, dtype=torch.int8), bf16(64)), Int4Weight(qdata, scales, zeros, 32),
              Int4Weight(qdata, scales, None, 32), DenseWeight(bf16(64, 64))]
    x = bf16(2, 3, width)
    for leaf in leaves:
        with pytest.raises(InputError, match=rf"\[2, 3, {width}\].*\[64, 64\]"):
            leaf.linear(x)
        with pytest.raises(InputError, match=r"bias"):
            leaf.linear(bf16(1, 64), bf16(63))
    with torch.no_grad(), pytest.raises(InputError, match=rf"\[2, 3, {width}\].*\[64, 64\]"):
        pangu_fn.layers.linear(x, {"weight": bf16(64, 64)})  # eager inference: the native bf16 path


# one way to break each argument of a wrapper; None: the valid call
INT8_FAULTS = [None, "x_width", "x_dtype", "x_rank", "x_strided", "q_dtype", "q_strided", "scales_len", "scales_dtype",
               "scales_rank", "bias_len"]
# the activations (and scales) the kernels take: bf16 everywhere, fp32 too with the AVX2 kernels
FLOATS = st.sampled_from([torch.bfloat16, torch.float32])
BF16_FAULTS = [None, "x_width", "x_dtype", "x_strided", "x_expanded", "w_dtype", "w_strided", "w_rank", "bias_len",
               "bias_rank"]
INT4_FAULTS = [None, "x_width", "x_dtype", "x_strided", "q_dtype", "q_bytes", "q_rows", "scales_rows", "scales_blocks",
               "scales_dtype", "zeros_shape", "zeros_dtype", "group", "group_zero", "bias_len", "q_strided"]
DEQ_FAULTS = [None, "q_dtype", "q_bytes", "q_rows", "scales_dtype", "zeros_shape", "zeros_dtype", "group",
              "group_zero", "q_strided"]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, not contiguous (every other element of a twice-as-wide tensor)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@FUZZ
@given(m=st.integers(1, 9), n=st.integers(1, 40), k=st.sampled_from([16, 32, 64, 96]), x_dtype=FLOATS,
       s_dtype=FLOATS, with_bias=st.booleans(), fault=st.sampled_from(INT8_FAULTS))
def test_fuzz_int8_linear(m, n, k, x_dtype, s_dtype, with_bias, fault):
    x, q = bf16(m, k).to(x_dtype), torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s, b = bf16(n, seed=1).abs().to(s_dtype), bf16(n, seed=2) if with_bias else None
    x = {"x_width": bf16(m, k + 32), "x_dtype": x.half(), "x_rank": x[None], "x_strided": strided(x)}.get(fault, x)
    q = {"q_dtype": q.to(torch.int16), "q_strided": strided(q)}.get(fault, q)
    s = {"scales_len": bf16(n + 1), "scales_dtype": s.half(), "scales_rank": s[:, None]}.get(fault, s)
    b = bf16(n + 1) if fault == "bias_len" else b
    if fault is not None:
        with pytest.raises(InputError):
            native.int8_linear(x, q, s, b)
        return
    y = native.int8_linear(x, q, s, b)
    if y is not None:
        assert y.dtype == x_dtype and y.shape == (m, n)
        assert close(y, F.linear(x.float(), q.float() * s.float()[:, None], None if b is None else b.float()))


@FUZZ
@given(m=st.integers(1, 9), n=st.integers(1, 40), k=st.sampled_from([16, 32, 64, 96]), x_dtype=FLOATS,
       with_bias=st.booleans(), fault=st.sampled_from(BF16_FAULTS))
def test_fuzz_bf16_linear(m, n, k, x_dtype, with_bias, fault):
    x, w = bf16(m, k).to(x_dtype), bf16(n, k, seed=1)
    b = bf16(n, seed=2).to(x_dtype) if with_bias or fault in ("bias_len", "bias_rank") else None
    x = {"x_width": bf16(m, k - 8), "x_dtype": x.half(), "x_strided": strided(x),
         "x_expanded": bf16(1, k).expand(m + 1, k)}.get(fault, x)
    w = {"w_dtype": w.half(), "w_strided": strided(w), "w_rank": w[None]}.get(fault, w)
    b = {"bias_len": bf16(n + 3), "bias_rank": bf16(1, n)}.get(fault, b)
    if fault is not None:
        with pytest.raises(InputError):
            native.bf16_linear(x, w, b)
        return
    y = native.bf16_linear(x, w, b)
    if y is not None:
        assert y.dtype == x_dtype and y.shape == (m, n)
        assert close(y, F.linear(x.float(), w.float(), None if b is None else b.float()))


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 per block of 32 as the tiled int4 product rounds it (scale max|x| / 127)."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    return (torch.round(blocks * (torch.full_like(top, 127) / top)) * (top / 127)).reshape(x.shape)


@FUZZ
@given(m=st.integers(1, 9), n=st.integers(1, 24), blocks=st.integers(1, 4), g=st.sampled_from([32, 64, 128]),
       sym=st.booleans(), x_dtype=FLOATS, s_dtype=FLOATS, with_bias=st.booleans(), fault=st.sampled_from(INT4_FAULTS),
       tiled=st.booleans())
def test_fuzz_int4_linear(m, n, blocks, g, sym, x_dtype, s_dtype, with_bias, fault, tiled):
    """MatMulNBits bytes, or the AVX2 tiles of the same codes (any N: the last tile padded)."""
    k = blocks * g
    x, b = bf16(m, k).to(x_dtype), bf16(n, seed=3) if with_bias else None
    q, s, z = int4_parts(n, k, g, seed=blocks)
    z, s = None if sym else z, s.to(s_dtype)
    weight = int4_weight(q, s, z, g)
    q = to_tiles(unpack_nibbles(q).reshape(n, k)) if tiled else q
    x = {"x_width": bf16(m, k + g), "x_dtype": x.half(), "x_strided": strided(x)}.get(fault, x)
    q = {"q_dtype": q.view(torch.int8), "q_bytes": q[..., :-1].contiguous(), "q_rows": torch.cat([q, q[:1]]),
         "q_strided": strided(q)}.get(fault, q)
    s = {"scales_rows": bf16(n + 8, blocks), "scales_blocks": bf16(n, blocks + 1),
         "scales_dtype": s.half()}.get(fault, s)
    if fault in ("zeros_shape", "zeros_dtype"):
        z = torch.zeros(n, blocks + 1, dtype=torch.uint8) if fault == "zeros_shape" else torch.zeros(n, blocks)
    group = {"group": g * 2, "group_zero": 0}.get(fault, g)
    b = bf16(n + 1) if fault == "bias_len" else b
    if fault is not None:
        with pytest.raises(InputError):
            native.int4_linear(x, q, s, z, group, b)
        return
    y = native.int4_linear(x, q, s, z, g, b)
    if y is not None:
        assert y.dtype == x_dtype and y.shape == (m, n)
        assert close(y, F.linear(int8_rounded(x) if tiled else x.float(), weight, None if b is None else b.float()))


@FUZZ
@given(n=st.integers(1, 24), blocks=st.integers(1, 4), g=st.sampled_from([32, 64, 128]), sym=st.booleans(),
       fault=st.sampled_from(DEQ_FAULTS))
def test_fuzz_int4_dequantize(n, blocks, g, sym, fault):
    q, s, z = int4_parts(n, blocks * g, g, seed=n)
    z = None if sym else z
    q = {"q_dtype": q.to(torch.int8), "q_bytes": q[:, :, :-1].contiguous(), "q_rows": q[:-1] if n > 1 else q[:, :0],
         "q_strided": strided(q)}.get(fault, q)
    s = s.half() if fault == "scales_dtype" else s
    if fault in ("zeros_shape", "zeros_dtype"):
        z = torch.zeros(n + 1, blocks, dtype=torch.uint8) if fault == "zeros_shape" else torch.zeros(n, blocks)
    group = {"group": g * 2, "group_zero": 0}.get(fault, g)
    if fault is not None:
        with pytest.raises(InputError):
            native.int4_dequantize(q, s, z, group)
        return
    w = native.int4_dequantize(q, s, z, g)
    if w is not None:
        assert torch.equal(w, int4_weight(q, s, z, g).bfloat16())
