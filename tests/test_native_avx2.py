"""The AVX2 kernels (`native_avx2.c`, built where the CPU has AVX2 but not AVX-512): each
product against the fp32 dequantize-then-matmul reference, for fp32 and bf16 activations,
1-9 rows (passes of 4 rows), with and without bias and zero points (the int4 tiles against
activations rounded to int8 per 32 in torch); shapes they do not take return None (the callers
then use torch's kernels). Skipped where the AVX2 build does not run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pangu_tools.prune import read_text_tokens

import pangu_fn as pf
from pangu_fn import backend, native
from pangu_fn.errors import InputError
from pangu_fn.model import forward
from pangu_fn.quant import quantize_int4, quantize_int8
from pangu_fn.quant.packing import from_tiles, to_tiles
from pangu_fn.quant.weights import Int4Weight
from pangu_fn.tokenizer import load_tokenizer

pytestmark = pytest.mark.skipif(not native.avx2(), reason=native.status())


def bounded(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """fp32: fp32 summation error only (the weights convert exactly); bf16: also one bf16
    rounding of each output (checked at 2^-8)."""
    rel = 2**-8 if dtype == torch.bfloat16 else 0.0
    return bool(((y.float() - ref).abs() <= rel * ref.abs() + 2e-5 * ref.abs().max()).all())


def draw(rows: int, n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    return w, torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", range(1, 10))
def test_int8_and_bf16_kernels_equal_the_fp32_product(rows, dtype):
    for n, k, with_bias in [(37, 96, True), (300, 768, False)]:
        w, x, b = draw(rows, n, k, dtype, seed=rows)
        b = b if with_bias else None
        ref_bias = None if b is None else b.float()
        leaf = quantize_int8(w, dtype)
        y = native.int8_linear(x, leaf.qdata, leaf.scales, b)
        assert y.dtype == dtype and y.shape == (rows, n)
        assert bounded(y, F.linear(x.float(), leaf.dequantize(torch.float32), ref_bias), dtype)
        wb = w.bfloat16()
        y = native.bf16_linear(x, wb, b)
        assert y.dtype == dtype and y.shape == (rows, n)
        assert bounded(y, F.linear(x.float(), wb.float(), ref_bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,g,sym", [(1, 32, True), (1, 128, False), (2, 64, False), (4, 128, True),
                                        (5, 32, False), (9, 256, True)])
def test_int4_kernel_equals_the_fp32_product(rows, g, sym, dtype):
    """One bf16 row takes the int16 route, more rows (and fp32) the fp32 one: both within bounds."""
    w, x, b = draw(rows, 70, 512, dtype, seed=g + rows)
    leaf = quantize_int4(w, g, sym, dtype)
    for bias in (b, None):
        y = native.int4_linear(x, leaf.qdata, leaf.scales, leaf.zero_points, g, bias)
        ref = F.linear(x.float(), leaf.dequantize(torch.float32), None if bias is None else bias.float())
        assert y.dtype == dtype and y.shape == (rows, 70)
        assert bounded(y, ref, dtype)


def q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x rounded as the tiled int4 product rounds it: to int8 per block of 32, scale max|x| / 127."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    top = blocks.abs().amax(-1, keepdim=True)  # as the kernel: codes round(x * (127 / top)), scale top / 127
    inv = torch.full_like(top, 127) / top  # IEEE division (`127 / top` rounds differently: ties then part)
    return (torch.round(blocks * inv) * (top / 127)).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,g,sym", [(1, 32, True), (1, 128, False), (2, 64, False), (4, 128, True),
                                        (5, 32, False), (9, 256, True)])
def test_int4_tiles_equal_the_product_of_int8_activations(rows, g, sym, dtype):
    """AVX2 tiles: x rounded to int8 per 32 (computed here in torch) times the dequantized weight,
    to fp32 summation error (and the bf16 output's rounding); the tiles invert exactly."""
    w, x, b = draw(rows, 75, 512, dtype, seed=g + rows)  # 75 rows: the last tile holds 3 and padding
    leaf = quantize_int4(w, g, sym, dtype)
    tiles = to_tiles(leaf.codes())
    assert tiles.shape == (10, 64, 8, 4) and torch.equal(from_tiles(tiles, 75), leaf.codes())
    for bias in (b, None):
        y = native.int4_linear(x, tiles, leaf.scales, leaf.zero_points, g, bias)
        ref = F.linear(q8_blocks(x), leaf.dequantize(torch.float32), None if bias is None else bias.float())
        assert y.dtype == dtype and y.shape == (rows, 75)
        assert bounded(y, ref, dtype)
        exact = F.linear(x.float(), leaf.dequantize(torch.float32), None if bias is None else bias.float())
        assert not bounded(y, exact, torch.float32)  # the rounding is real: the check above can fail


def test_int4_tiles_carry_a_non_finite_activation_and_reject_wrong_shapes():
    leaf = quantize_int4(torch.randn(16, 128), 32, True, torch.bfloat16)
    tiles = to_tiles(leaf.codes())
    x = torch.ones(2, 128, dtype=torch.bfloat16)
    x[1, 40] = float("nan")
    y = native.int4_linear(x, tiles, leaf.scales, None, 32)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()
    with pytest.raises(InputError, match="expected tiles"):
        native.int4_linear(x, tiles[:1], leaf.scales, None, 32)


def test_shapes_the_kernels_do_not_take_return_none():
    x, q, s = torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.int8), torch.ones(8)
    assert native.int8_linear(x, q, s) is None  # K % 32
    wide = native.MAX_K + 32
    assert native.int8_linear(torch.zeros(1, wide), torch.zeros(2, wide, dtype=torch.int8), s[:2]) is None
    assert native.bf16_linear(x, torch.zeros(8, 48, dtype=torch.bfloat16), None) is None  # K % 32
    q96, s96 = torch.zeros(8, 4, 48, dtype=torch.uint8), torch.ones(8, 4)  # K = 384 in groups of 96
    assert native.int4_linear(torch.zeros(1, 384), q96, s96, None, 96) is None
    assert native.int4_dequantize(q96, s96.bfloat16(), None, 96) is None  # AVX-512 only


def test_a_non_finite_activation_reaches_the_outputs():
    """The int16 route scales blocks by their largest value: an infinity or NaN must not vanish."""
    leaf = quantize_int4(torch.randn(16, 128), 32, True, torch.bfloat16)
    x = torch.ones(1, 128, dtype=torch.bfloat16)
    x[0, 5] = float("inf")
    assert not torch.isfinite(native.int4_linear(x, leaf.qdata, leaf.scales, None, 32)).any()
    x[0, 5] = float("nan")
    assert torch.isnan(native.int4_linear(x, leaf.qdata, leaf.scales, None, 32)).all()


@torch.no_grad()
def test_fp32_leaves_and_the_custom_ops_take_the_kernels():
    """An fp32 int8 / int4 tree multiplies through the kernels (not a dequantized weight per call),
    and the compiled graphs' custom ops give the same numbers as eager calls."""
    w, x, b = draw(3, 64, 256, torch.float32, seed=7)
    int8, int4 = quantize_int8(w, torch.float32), quantize_int4(w, 64, False, torch.float32)
    assert backend.native_int8_fits(x, int8.scales) and int4.native_kernel_data is not None
    assert torch.equal(int8.linear(x, b), native.int8_linear(x, int8.qdata, int8.scales, b))
    assert torch.equal(int4.linear(x, b), native.int4_linear(x, int4.qdata, int4.scales, int4.zero_points, 64, b))
    assert torch.equal(torch.ops.pangu_backend.int8_linear(x, int8.qdata, int8.scales, b), int8.linear(x, b))
    assert torch.equal(torch.ops.pangu_backend.int4_linear(x, int4.qdata, int4.scales, int4.zero_points, 64, b),
                       int4.linear(x, b))
    tiled = Int4Weight(int4.qdata, int4.scales.bfloat16(), int4.zero_points, 64)  # bf16: AVX2 tiles (64 rows)
    data, xb = tiled.native_kernel_data, x.bfloat16()
    assert data[0].shape == (8, 32, 8, 4) and torch.equal(tiled.qdata, int4.qdata)
    assert torch.equal(tiled.linear(xb, b.bfloat16()), native.int4_linear(xb, *data, 64, b.bfloat16()))
    assert torch.equal(torch.ops.pangu_backend.int4_linear(xb, *data, 64, None), tiled.linear(xb))
    wb = w.bfloat16()
    assert torch.equal(torch.ops.pangu_backend.bf16_linear(x.bfloat16(), wb, None), native.bf16_linear(x.bfloat16(), wb, None))


@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_fp32_kernel_equals_torch(rows):
    """`native.f32_linear` (row-major fp32 weights): fp32 summation error only; widths it does
    not take return None; an input that does not fit the weight raises."""
    for n, k, with_bias in [(37, 96, True), (3000, 768, False)]:
        w, x, b = draw(rows, n, k, torch.float32, seed=rows)
        b = b if with_bias else None
        y = native.f32_linear(x, w, b)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        assert bounded(y, F.linear(x, w, b), torch.float32)
    assert native.f32_linear(torch.randn(rows, 48), torch.randn(8, 48), None) is None  # K % 32 != 0
    with pytest.raises(InputError, match="input width of 64"):
        native.f32_linear(torch.randn(rows, 32), torch.randn(8, 64), None)



@torch.no_grad()
def test_int8_activations_of_the_tiles_cost_the_demo_model_no_perplexity(monkeypatch):
    """Teacher-forced decoding (a cache, one token a step, 8 rows) of the committed demo model in
    int4 g32: with the tiles (activations rounded to int8 per 32) within 1% of the perplexity of
    the same codes on the int16 route (measured 69.29 vs 69.32 on 16 x 128 tokens; fp32 68.45)."""
    demo = Path(__file__).resolve().parent.parent / "models" / "demo"
    params, cfg = pf.load(demo / "target")
    ids = read_text_tokens(demo / "heldout.jsonl", load_tokenizer(demo / "target"))
    rows = torch.tensor([ids[i * 64:(i + 1) * 64] for i in range(8)])

    def perplexity(tree):
        cache, total = pf.init_cache(tree, cfg, 8, 64), 0.0
        for t in range(63):
            logits, cache = forward(tree, cfg, rows[:, t:t + 1], cache)
            total += F.cross_entropy(logits[:, -1].float(), rows[:, t + 1], reduction="sum").item()
        return math.exp(total / (8 * 63))

    recipe = pf.QuantRecipe("int4", group_size=32, head="int4")
    tiled = pf.quantize(params, recipe, cfg)
    monkeypatch.setattr(native, "int4_tiles_fit", lambda n, k, g: False)
    plain = pf.quantize(params, recipe, cfg)
    assert tiled["blocks"][0]["mlp"]["down"]["weight"].native_kernel_data[0].dim() == 4
    assert plain["blocks"][0]["mlp"]["down"]["weight"].native_kernel_data[0].dim() == 3
    with_tiles, without = perplexity(tiled), perplexity(plain)
    assert with_tiles != without and abs(with_tiles / without - 1) < 0.01
