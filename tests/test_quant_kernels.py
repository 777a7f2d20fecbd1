"""Each kernel path of the quantized leaves computes dequantize-then-matmul (to float
tolerance), and the export ops' eager implementations equal the leaves' `linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pangu_fn.layers
import pangu_fn.quant
from pangu_fn import native
from pangu_fn.quant import DenseWeight, Int4Weight, quantize_int4, quantize_int8
from pangu_fn.quant.packing import cpu_pack, cpu_unpack, from_matmul_nbits
from pangu_fn.quant.rtn import int4_dequantize

GEN = torch.Generator().manual_seed(0)


def reference(leaf, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 dequantize-then-matmul of the same (bf16-rounded where the kernel reads bf16) inputs."""
    return F.linear(x.float(), leaf.dequantize(torch.float32), None if bias is None else bias.float())


def int16_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """x rounded as the AVX2 int4 kernel's integer route rounds bf16 activations on MatMulNBits
    bytes: to int16 per group of g, scale max|x| / 32767 (computed as the kernel does)."""
    groups = x.float().reshape(x.shape[0], -1, g)
    top = groups.abs().amax(-1, keepdim=True)
    return (torch.round(groups * (torch.full_like(top, 32767) / top)) * (top / 32767)).reshape(x.shape)


def assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = (y.float() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err} vs max |ref| {ref.abs().max().item()}"


def inputs(k: int, n: int, dtype: torch.dtype, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, rows, k, generator=GEN).to(dtype)
    bias = (0.1 * torch.randn(n, generator=GEN)).to(dtype)
    return x, bias


@pytest.mark.parametrize("n,k", [(96, 64), (40, 48), (24, 24), (300, 96)])
def test_int8_kernels_equal_dequantize_then_matmul(n, k):
    w = torch.randn(n, k, generator=GEN)
    leaf = quantize_int8(w, torch.bfloat16)
    x, bias = inputs(k, n, torch.bfloat16)
    y = leaf.linear(x, bias)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    assert_close(y, reference(leaf, x, bias), 2e-2)  # bf16 output rounding
    if k % 32 == 0 and native.library() is not None:  # the native kernel: the same numbers
        direct = native.int8_linear(x.reshape(-1, k), leaf.qdata, leaf.scales, bias).view(2, 3, n)
        assert torch.equal(y, direct)
    elif k % 16 == 0:  # torch's CPU kernel path: same numbers as calling it directly
        direct = torch._weight_int8pack_mm(x.reshape(-1, k), leaf.qdata, leaf.scales).view(2, 3, n) + bias
        assert torch.equal(y, direct)
    fp32 = leaf.astype(torch.float32)  # the dequantize-then-matmul path (any device)
    assert_close(fp32.linear(x.float(), bias.float()), reference(leaf, x, bias), 1e-5)
    x, _ = inputs(k, n, torch.bfloat16, rows=100)  # 200 rows: dequantize once, bf16 matmul
    assert_close(leaf.linear(x, bias), reference(leaf, x, bias), 2e-2)


@pytest.mark.parametrize("rows", [1, 4, 5, 31])
def test_native_int8_kernel_rounds_the_exact_product_once(rows):
    """The product of bf16 activations and int8 * bf16-scale weights is exact in fp32 term by
    term; the kernel sums in fp32 and rounds once to bf16, so each output is within a bf16
    rounding (2^-9 relative) of the fp32 reference, plus fp32 summation error."""
    if native.library() is None:
        pytest.skip(native.status())
    n, k = 1000, 768
    leaf = quantize_int8(torch.randn(n, k, generator=GEN), torch.bfloat16)
    x = torch.randn(rows, k, generator=GEN).to(torch.bfloat16)
    y = native.int8_linear(x, leaf.qdata, leaf.scales)
    ref = reference(leaf, x, None)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert bool(((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-5 * ref.abs().max()).all())
    assert native.int8_linear(x[:, :760].contiguous(), leaf.qdata[:, :760].contiguous(), leaf.scales) is None  # K % 32
    wide = torch.zeros(2, native.MAX_K + 32, dtype=torch.int8)
    assert native.int8_linear(torch.zeros(1, native.MAX_K + 32, dtype=torch.bfloat16), wide, leaf.scales[:2]) is None


def within_one_bf16_rounding(y: torch.Tensor, ref: torch.Tensor, slack: float = 1e-5) -> bool:
    """Each output within a bf16 rounding (2^-9 relative, checked at 2^-8) of the fp32
    reference, plus fp32 summation error (`slack` of the largest output)."""
    return bool(((y.float() - ref).abs() <= ref.abs() * 2**-8 + slack * ref.abs().max()).all())


# up to 6 rows a pass, in equal chunks (7 = 4 + 3, 13 = 5 + 4 + 4); 2 accumulators per output at
# 1-2 rows (K % 64 == 32 leaves a tail); outputs four at a time from 2 rows, N % 4 one at a time
@pytest.mark.parametrize("rows,k", [(1, 768), (2, 96), (5, 256), (6, 160), (7, 768), (9, 96), (13, 256)])
def test_native_bf16_kernel_rounds_the_exact_product_once(rows, k):
    """bf16 products are exact in fp32; the kernel sums them in fp32, adds the bias, rounds once."""
    if not native.bf16_kernels():
        pytest.skip(native.status())
    n = 302
    w = torch.randn(n, k, generator=GEN).bfloat16()
    x, bias = torch.randn(rows, k, generator=GEN).bfloat16(), torch.randn(n, generator=GEN).bfloat16()
    y = native.bf16_linear(x, w, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    assert within_one_bf16_rounding(y, F.linear(x.float(), w.float(), bias.float()))
    assert_close(native.bf16_linear(x, w, bias.float()), F.linear(x.float(), w.float(), bias.float()), 2e-2)  # added after
    assert within_one_bf16_rounding(native.bf16_linear(x, w, None), F.linear(x.float(), w.float()))
    assert native.bf16_linear(x[:, :k - 16].contiguous(), w[:, :k - 16].contiguous(), None) is None  # K % 32


@pytest.mark.parametrize("rows,g,sym", [(1, 32, True), (1, 64, False), (8, 128, True), (9, 32, False), (3, 256, False)])
def test_native_int4_kernel_rounds_the_exact_product_once(rows, g, sym):
    """The kernel reads the MatMulNBits bytes as stored: codes as bf16 128 + c (exact), the
    128 and zero point taken out through group sums of the activations, then one rounding."""
    if not native.bf16_kernels():
        pytest.skip(native.status())
    n, k = 200, 512
    leaf = quantize_int4(torch.randn(n, k, generator=GEN), g, sym, torch.bfloat16)
    x, bias = torch.randn(rows, k, generator=GEN).bfloat16(), torch.randn(n, generator=GEN).bfloat16()
    y = native.int4_linear(x, leaf.qdata, leaf.scales, leaf.zero_points, g, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    rounded = int16_groups(x, g) if native.avx2() else x  # the AVX2 build's integer route
    assert within_one_bf16_rounding(y, reference(leaf, rounded, bias), slack=2e-5)
    if g in (32, 64):  # K = 448: a multiple of G, not of 128
        part = slice(None, 448 // g)
        assert native.int4_linear(x[:, :448].contiguous(), leaf.qdata[:, part].contiguous(),
                                  leaf.scales[:, part].contiguous(), None, g) is None
    q96, s96 = torch.zeros(n, 4, 48, dtype=torch.uint8), torch.ones(n, 4).bfloat16()  # K = 384 in groups of 96
    assert native.int4_linear(x[:, :384].contiguous(), q96, s96, None, 96) is None  # a group the kernel does not take


def test_a_failed_build_leaves_the_torch_kernels_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PANGU_FN_CACHE", str(tmp_path / "cache"))
    native.forget()
    try:
        if native._unsupported() is not None:
            pytest.skip(native._unsupported())
        assert native.library() is None and "build failed" in native.status()
        w = torch.randn(64, 128, generator=GEN)
        x = torch.randn(3, 128, generator=GEN).bfloat16()
        leaf = quantize_int8(w, torch.bfloat16)
        assert torch.equal(leaf.linear(x), torch._weight_int8pack_mm(x, leaf.qdata, leaf.scales))
        int4 = quantize_int4(w, 32, True, torch.bfloat16)
        assert int4.native_kernel_data is None and int4.cpu_kernel_data is not None
        assert DenseWeight(w.bfloat16()).packed is not None or not pangu_fn.quant.kernels._mkldnn_bf16()
        assert not any((tmp_path / "cache").glob("*.so"))
    finally:
        native.forget()


def test_a_build_without_avx512_bf16_keeps_int8_and_hands_bf16_int4_to_torch(monkeypatch, tmp_path):
    """A CPU with AVX-512F but no AVX512-BF16 (built here with -mno-avx512bf16): the int8 kernel
    runs, the bf16 and int4 kernels are left out, and those leaves take torch's kernels."""
    if native._unsupported() is not None or torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip(native._unsupported() or "needs AVX-512 (the AVX2 build has all three kernels)")
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-mno-avx512bf16"])
    monkeypatch.setenv("PANGU_FN_CACHE", str(tmp_path))
    native.forget()
    try:
        if native.library() is None:
            pytest.skip(native.status())
        assert native.status() == "native kernels: int8 (no AVX512-BF16: bf16 and int4 use torch's)"
        w = torch.randn(64, 128, generator=GEN)
        x = torch.randn(3, 128, generator=GEN).bfloat16()
        int8 = quantize_int8(w, torch.bfloat16)
        assert native.int8_linear(x, int8.qdata, int8.scales) is not None
        assert native.bf16_linear(x, w.bfloat16(), None) is None
        int4 = quantize_int4(w, 32, True, torch.bfloat16)
        assert int4.native_kernel_data is None and int4.cpu_kernel_data is not None
        assert native.int4_dequantize(int4.qdata, int4.scales, None, 32) is None
        assert_close(int4.linear(x), reference(int4, x, None), 2e-2)
        assert DenseWeight(w.bfloat16()).packed is not None or not pangu_fn.quant.kernels._mkldnn_bf16()
    finally:
        native.forget()


def test_int8_leaf_falls_back_to_torch_kernel_without_the_native_one(monkeypatch):
    leaf = quantize_int8(torch.randn(64, 128, generator=GEN), torch.bfloat16)
    x, bias = inputs(128, 64, torch.bfloat16)
    monkeypatch.setenv("PANGU_FN_NATIVE", "0")
    native.forget()
    try:
        direct = torch._weight_int8pack_mm(x.reshape(-1, 128), leaf.qdata, leaf.scales).view(2, 3, 64) + bias
        assert torch.equal(leaf.linear(x, bias), direct)
    finally:
        monkeypatch.undo()
        native.forget()


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("n,k,g,sym", [(64, 128, 32, True), (40, 256, 64, False), (200, 128, 128, True),
                                       (600, 64, 32, False), (512, 128, 64, True)])  # packed in chunks of 256 rows
def test_int4_kernels_equal_dequantize_then_matmul(n, k, g, sym, path, monkeypatch):
    if path == "torch":  # the leaf then holds torch's CPU pack
        monkeypatch.setattr(native, "int4_fits", lambda k, g: False)
        monkeypatch.setattr(native, "int4_tiles_fit", lambda n, k, g: False)
    elif not native.int4_fits(k, g):
        pytest.skip(f"native int4 kernel: K={k}, G={g} not taken here ({native.status()})")
    w = torch.randn(n, k, generator=GEN)
    leaf = quantize_int4(w, g, sym, torch.bfloat16)
    x, bias = inputs(k, n, torch.bfloat16)
    y = leaf.linear(x, bias)
    if path == "native":
        assert leaf.native_kernel_data is not None and leaf.cpu_kernel_data is None  # no second copy
        direct = native.int4_linear(x.reshape(-1, k), *leaf.native_kernel_data, g, bias)
        assert torch.equal(y, direct.view(2, 3, n))
    else:
        assert leaf.native_kernel_data is None and leaf.cpu_kernel_data is not None
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    assert_close(y, reference(leaf, x, bias), 2e-2)
    fp32 = leaf.astype(torch.float32)  # fp32 activations: the AVX2 kernel, else dequantize-then-matmul
    fp32_native = path == "native" and torch.float32 in native.activation_dtypes()
    assert fp32.cpu_kernel_data is None and (fp32.native_kernel_data is not None) == fp32_native
    assert_close(fp32.linear(x.float(), bias.float()), reference(leaf, x, bias), 1e-5)
    x, _ = inputs(k, n, torch.bfloat16, rows=100)  # 200 rows: dequantize once, bf16 matmul
    assert_close(leaf.linear(x, bias), reference(leaf, x, bias), 2e-2)


def test_many_rows_dequantize_a_large_weight_in_chunks():
    """Prefill-sized inputs run dequantize-then-matmul, DEQUANTIZE_CHUNK weight rows at a time."""
    w = torch.randn(4100, 64, generator=GEN)
    bias = (0.1 * torch.randn(4100, generator=GEN)).bfloat16()
    x = torch.randn(1, 130, 64, generator=GEN).bfloat16()
    for leaf in (quantize_int8(w, torch.bfloat16), quantize_int4(w, 32, False, torch.bfloat16)):
        assert leaf.linear(x[:, :1], bias).shape == (1, 1, 4100)  # one row: the kernel path
        assert_close(leaf.linear(x, bias), reference(leaf, x, bias), 2e-2)
        assert torch.equal(leaf.dequantize(rows=slice(4096, 4100)), leaf.dequantize()[4096:])


def test_int4_leaf_keeps_one_copy_and_rebuilds_its_canonical_data():
    w = torch.randn(64, 128, generator=GEN)
    canonical = quantize_int4(w, 32, False, torch.float32)  # no CPU pack: holds qdata
    packed = canonical.astype(torch.bfloat16)
    assert torch.equal(packed.qdata, canonical.qdata)
    assert torch.equal(packed.to_tensors()["zero_points"], canonical.zero_points)
    if cpu_unpack(cpu_pack(torch.zeros(16, 32, dtype=torch.uint8)), 16, 32) is not None:
        codes_bytes = 64 * 128 // 2  # the layout is invertible here: only the packed copy is held
        assert packed.resident_nbytes < packed.nbytes + codes_bytes // 2


def test_int4_leaf_never_writes_the_tensors_it_is_given():
    w = torch.randn(512, 64, generator=GEN)
    ref = quantize_int4(w, 32, True, torch.float32).qdata
    held = ref.clone()
    leaf = Int4Weight(held, quantize_int4(w, 32, True, torch.bfloat16).scales, None, 32)
    x = torch.randn(3, 64, generator=GEN).bfloat16()
    assert_close(leaf.linear(x), reference(leaf, x, None), 2e-2)
    assert torch.equal(held, ref) and torch.equal(leaf.qdata, ref)


@pytest.mark.parametrize("path", ["native", "onednn"])
@torch.no_grad()
def test_dense_bf16_leaf_paths_equal_f_linear(path, monkeypatch):
    if path == "onednn":  # the leaf then holds oneDNN's prepacked copy only
        monkeypatch.setattr(native, "bf16_fits", lambda k: False)
    elif not native.bf16_fits(64):
        pytest.skip(native.status())
    w = torch.randn(96, 64, generator=GEN).bfloat16()
    leaf = DenseWeight(w)
    assert (leaf.packed is None) == (path == "native") or not pangu_fn.quant.kernels._mkldnn_bf16()
    x, bias = inputs(64, 96, torch.bfloat16)
    assert torch.equal(leaf.weight, w)  # the plain tensor, or unpacked from oneDNN's layout on demand
    y = leaf.linear(x, bias)
    assert_close(y, F.linear(x.float(), w.float(), bias.float()), 2e-2)
    if path == "native":
        assert torch.equal(y, native.bf16_linear(x.reshape(-1, 64), w, bias).view(2, 3, 96))
        assert torch.equal(pangu_fn.layers.linear(x, {"weight": w, "bias": bias}), y)  # a plain bf16 tensor too
    x, _ = inputs(64, 96, torch.bfloat16, rows=100)  # 200 rows: F.linear (or oneDNN) for many rows
    assert_close(leaf.linear(x, bias), F.linear(x.float(), w.float(), bias.float()), 2e-2)
    tokens = torch.tensor([[3, 5], [0, 95]])
    assert torch.equal(DenseWeight(w, keep_dense=True).embedding(tokens), w[tokens])


def test_native_int4_dequantize_equals_the_torch_ops():
    """The prefill path's dequantization: the same bf16 numbers as `int4_dequantize`."""
    if not native.bf16_kernels() or native.avx2():  # AVX-512 only
        pytest.skip(native.status())
    for g, sym in [(32, True), (64, False), (256, False)]:
        leaf = quantize_int4(torch.randn(300, 512, generator=GEN), g, sym, torch.bfloat16)
        zeros = leaf.zero_points
        ref = int4_dequantize(from_matmul_nbits(leaf.qdata), leaf.scales, zeros, torch.bfloat16)
        assert torch.equal(native.int4_dequantize(leaf.qdata, leaf.scales, zeros, g), ref)
        assert torch.equal(leaf.dequantize(rows=slice(100, 250)), ref[100:250])
        fp32 = int4_dequantize(from_matmul_nbits(leaf.qdata), leaf.scales, zeros, torch.float32)
        assert torch.equal(leaf.dequantize(torch.float32), fp32)  # other dtypes: the torch ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_ops_eager_equal_leaf_linear(dtype):
    w = torch.randn(48, 64, generator=GEN)
    x, bias = inputs(64, 48, dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    q8 = quantize_int8(w, dtype)
    assert_close(torch.ops.pangu.int8_linear(x, q8.qdata, q8.scales, bias), q8.linear(x, bias).float(), tol)
    assert_close(torch.ops.pangu.int8_linear(x, q8.qdata, q8.scales, None), q8.linear(x).float(), tol)
    for sym in (True, False):
        q4 = quantize_int4(w, 32, sym, dtype)
        y = torch.ops.pangu.int4_linear(x, q4.qdata, q4.scales, q4.zero_points, bias, 32, 64)
        assert_close(y, q4.linear(x, bias).float(), tol)


def test_export_traces_leaves_as_custom_ops():
    q8 = quantize_int8(torch.randn(32, 64, generator=GEN), torch.float32)
    q4 = quantize_int4(torch.randn(16, 32, generator=GEN), 32, False, torch.float32)

    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return q4.linear(q8.linear(x)[..., :32])

    ep = torch.export.export(Two(), (torch.randn(2, 64),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"pangu.int8_linear.default", "pangu.int4_linear.default"} <= targets
    x = torch.randn(2, 64)
    assert_close(ep.module()(x), Two()(x), 1e-6)
