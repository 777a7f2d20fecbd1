"""Weight-streaming kernels for x86-64 CPUs with AVX-512 or AVX2, compiled from C on first use.

Batch-1 decoding reads every weight once per token, so it runs at the speed weights stream
from memory. torch's weight-only kernels and oneDNN's bf16 matmul move 12-20 GB/s here with
two threads, well under what the memory delivers; `native_kernels.c` streams 20-30 GB/s:

- `int8_linear`: int8 weights with per-row scales, 16 weights at a time converted to fp32;
- `bf16_linear`: plain bf16 weights through AVX512-BF16 dot products (no prepacked copy); from
  two activation rows on, four outputs at a time, so that each activation load feeds four
  products and the four sums share one reduction (5 rows: 0.55-0.8x the time of one output
  at a time, e.g. speculative verification);
- `int4_linear`: the ONNX MatMulNBits bytes themselves (no second packed copy), codes turned
  into bf16 by byte unpacking, group scales applied per 128-bit lane; `int4_dequantize`
  writes the bf16 weight for prefill-sized products (7x faster than the torch ops).

Each takes up to 8 activation rows (bf16: 6, int8: 4) per pass over the weight.

On CPUs with AVX2 and FMA but no AVX-512 (AMD Zen 2/3, most laptops), `native_avx2.c` is built
instead, with the same three products (no `int4_dequantize`): activations fp32 or bf16 (the
output in the same dtype), weights converted exactly to fp32 on 8 lanes (int8: sign extension;
int4: nibbles minus the zero point as int8; bf16: a 16-bit shift), FMA sums, and the bias
added in the kernel. Every weight row is read once per call whatever the number of rows (they
pass over it 4 at a time while it is in L1).

The C code
trusts its pointers and sizes, so every wrapper here checks its arguments first (dtypes, CPU,
row-major, the input width against the weight, the shapes of scales, zero points, group size
and bias) and raises `InputError` naming the shapes, whether or not the library runs here.

The library is compiled once per machine with the system C compiler (`$CC`, else `cc`;
`-O3 -march=native -fopenmp`) into `$PANGU_FN_CACHE` (default `~/.cache/pangu_fn`), under a
file lock, and loaded with ctypes after torch, so its OpenMP threads are torch's own. The file
name hashes the source, the flags, the compiler's path and `--version`, and the macros it
predefines for `-march=native` (the instruction sets it targets). The cache folder is made mode
0700; a folder another user owns, or a cached file that is a link, not ours, or writable by
others, is not used: the library is then built in a fresh private temporary folder. A cached
file that fails to load is rebuilt once. Which source is built follows
`torch.backends.cpu.get_cpu_capability()` and the compiler's macros: "AVX512" and `__AVX512F__`
the AVX-512 one, else "AVX2" (or "AVX512", e.g. under `ATEN_CPU_CAPABILITY=avx2` it reports
"AVX2") with `__AVX2__` and `__FMA__` the AVX2 one. Without Linux on x86-64 with one of those,
without a compiler, or with `PANGU_FN_NATIVE=0`, the functions return None and the callers use
torch's kernels; `status()` says which kernels run and why not. AVX512-BF16 (which torch's
capability string does not report) is known from the compiler's `__AVX512BF16__`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import InputError

_HERE = Path(__file__).parent
# the C files each library is built from (the AVX2 one holds the fused step, native_step.c)
SOURCES = {"avx512": (_HERE / "native_kernels.c",), "avx2": (_HERE / "native_avx2.c", _HERE / "native_step.c")}
# the compiler macros each source needs under FLAGS
NEEDS = {"avx512": ("__AVX512F__",), "avx2": ("__AVX2__", "__FMA__")}
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_reason: list[str] = []
_notes: list[str] = []

# The AVX2 kernels' `flags` argument: which tensors are bf16 (else fp32).
X_BF16, SCALES_BF16, BIAS_BF16 = 1, 2, 4
# Below this many weights the AVX2 kernels run on one thread: one bf16 row, median of 200 on the
# busy machine, 256 x 256 11 vs 17 us, 512 x 256 16 vs 12 us, 1024 x 256 27 vs 17 us; and a
# parallel region's slowest calls wait for a descheduled thread (p90 40 ms vs 26 us there).
PARALLEL_WEIGHTS = 1 << 18

# Above this input width torch's int8 kernel is faster: a row of fp32 activations (4K bytes) no
# longer stays in L1 beside the streamed weights (two threads, timed in turns: 2048 x 8192 12 vs
# 16 GB/s; 2048 x 2048 21 vs 14 GB/s; 768 x 3072 20 vs 16 GB/s).
MAX_K = 4096


class BuildError(Exception):
    """The library could not be built or loaded (the reason `status()` reports)."""


def status() -> str:
    """Which native kernels run here, or why none does (loads the library if needed)."""
    lib = library()
    if lib is None:
        return f"native kernels: off ({_reason[0]})"
    note = f" ({'; '.join(_notes)})" if _notes else ""
    if _is_avx2(lib):
        return f"native kernels: int8, bf16, int4, fp32 and the fused decode step (AVX2; fp32 or bf16 activations){note}"
    step = "; fp32 and the fused decode step (AVX2)" if step_library() is not None else ""
    if not _has_bf16(lib):
        return f"native kernels: int8 (no AVX512-BF16: bf16 and int4 use torch's){step}{note}"
    return f"native kernels: int8, bf16, int4{step}{note}"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (see the module doc)."""
    why = _unsupported()
    if why is None:
        try:
            lib = _load()
        except BuildError as e:
            why = str(e)
        else:
            if _is_avx2(lib):
                return _declare_avx2(lib)
            lib.pangu_native_has_bf16.restype = ctypes.c_int
            lib.pangu_int8_linear_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            if _has_bf16(lib):
                lib.pangu_bf16_linear.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
                lib.pangu_int4_linear_bf16.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_int]
                lib.pangu_int4_dequantize_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            for fn in ("pangu_int8_linear_bf16", "pangu_bf16_linear", "pangu_int4_linear_bf16",
                       "pangu_int4_dequantize_bf16"):
                if hasattr(lib, fn):
                    getattr(lib, fn).restype = ctypes.c_int
            return lib
    _reason.append(why)
    return None


def _is_avx2(lib: ctypes.CDLL) -> bool:
    return hasattr(lib, "pangu_avx2_int8_linear")


def _declare_avx2(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pangu_avx2_int8_linear.argtypes = [p] * 5 + [i64] * 3 + [i32] * 2
    lib.pangu_avx2_int4_linear.argtypes = [p] * 6 + [i64] * 4 + [i32] * 2
    lib.pangu_avx2_int4t_linear.argtypes = [p] * 6 + [i64] * 4 + [i32] * 2
    lib.pangu_avx2_bf16_linear.argtypes = [p] * 4 + [i64] * 3 + [i32] * 2
    lib.pangu_avx2_f32_linear.argtypes = [p] * 4 + [i64] * 3 + [i32] * 2
    lib.pangu_step.argtypes = [p] * 3 + [i64] * 2 + [p] * 2 + [i64, i32]  # native_step.c
    for fn in ("pangu_avx2_int8_linear", "pangu_avx2_int4_linear", "pangu_avx2_int4t_linear", "pangu_avx2_bf16_linear",
               "pangu_avx2_f32_linear", "pangu_step"):
        getattr(lib, fn).restype = ctypes.c_int
    return lib


@functools.cache
def step_library() -> ctypes.CDLL | None:
    """The AVX2 library, which holds the fused decode step (`native_step.c`), on any x86-64 CPU
    with AVX2 and FMA (AVX-512 ones build it beside their own library), or None where it cannot
    run (`PANGU_FN_NATIVE=0`, no compiler, another CPU)."""
    lib = library()
    if lib is not None and _is_avx2(lib):
        return lib
    if _unsupported() is not None:
        return None
    try:
        return _declare_avx2(_load("avx2"))
    except BuildError as e:
        _notes.append(f"no fused step: {e}")
        return None


@functools.cache
def avx2() -> bool:
    """True where the AVX2 kernels run (fp32 or bf16 activations)."""
    lib = library()
    return lib is not None and _is_avx2(lib)


def activation_dtypes() -> tuple[torch.dtype, ...]:
    """The activation dtypes the kernels here take (none where no kernels run)."""
    if avx2():
        return (torch.bfloat16, torch.float32)
    return (torch.bfloat16,) if library() is not None else ()


def forget() -> None:
    """Drop the loaded library and the cached answers, so that the next call looks again
    (after changing `PANGU_FN_NATIVE`, `CC` or `PANGU_FN_CACHE`)."""
    for cached in (library, step_library, avx2, bf16_kernels, bf16_fits, int4_fits):
        cached.cache_clear()
    _reason.clear()
    _notes.clear()


def _has_bf16(lib: ctypes.CDLL) -> bool:
    return bool(lib.pangu_native_has_bf16())


@functools.cache
def bf16_kernels() -> bool:
    """True where the bf16 and int4 kernels run."""
    lib = library()
    return lib is not None and (_is_avx2(lib) or _has_bf16(lib))


# ---- argument checks: the C code reads and writes exactly what these shapes say ----
# (conditions first, messages formatted only on failure: these run on every decode call)

def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


FLOATS = (torch.bfloat16, torch.float32)  # activations, scales and biases the kernels read


def _check(fn: str, name: str, t: object, dtype: torch.dtype | tuple[torch.dtype, ...],
           dims: tuple[int, ...]) -> None:
    """`t` is a row-major CPU tensor of `dtype` (or one of them) with one of `dims` dimensions."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if (isinstance(t, torch.Tensor) and t.dtype in dtypes and t.dim() in dims and t.is_cpu
            and t.is_contiguous()):
        return
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{fn}: expected {name} a tensor, found {type(t).__name__}")
    if t.dtype not in dtypes or t.dim() not in dims:
        raise InputError(f"{fn}: expected {name} {' or '.join(map(str, dtypes))} with "
                         f"{' or '.join(map(str, dims))} dimensions, found {t.dtype} {_shape(t)}")
    if not t.is_cpu:
        raise InputError(f"{fn}: expected {name} on the CPU, found it on {t.device}")
    raise InputError(f"{fn}: expected {name} {_shape(t)} contiguous (row-major), found strides {t.stride()}")


def _check_width(fn: str, x: torch.Tensor, n: int, k: int) -> None:
    if x.shape[-1] != k:
        raise InputError(f"{fn}: input {_shape(x)} does not fit weight [{n}, {k}] "
                         f"(expected an input width of {k}, found {x.shape[-1]})")


def _check_bias(fn: str, bias: object, n: int) -> None:
    if bias is None or (isinstance(bias, torch.Tensor) and bias.shape == (n,) and bias.is_floating_point()
                        and bias.is_cpu):
        return
    if isinstance(bias, torch.Tensor) and bias.is_floating_point() and bias.is_cpu:
        raise InputError(f"{fn}: expected bias [{n}] for {n} outputs, found bias {_shape(bias)}")
    raise InputError(f"{fn}: expected a float CPU bias [{n}], found {bias!r:.80}")


def _check_int4(fn: str, qdata: object, scales: object, zero_points: object, group_size: object) -> tuple[int, int]:
    """(N, K) of the int4 weight whose parts these are (see `int4_linear`)."""
    _check(fn, "scales", scales, FLOATS, (2,))
    _check(fn, "qdata", qdata, torch.uint8, (2, 3, 4))
    if not (type(group_size) is int and group_size >= 2 and group_size % 2 == 0):
        raise InputError(f"{fn}: expected an even integer group size >= 2, found {group_size!r}")
    n, blocks = scales.shape
    if qdata.dim() == 4:  # AVX2 tiles (quant.packing.to_tiles)
        if blocks * group_size % 8 or qdata.shape != ((n + 7) // 8, blocks * group_size // 8, 8, 4):
            raise InputError(f"{fn}: expected tiles [{(n + 7) // 8}, {blocks * group_size / 8:g}, 8, 4] for scales "
                             f"{_shape(scales)} and group size {group_size}, found qdata {_shape(qdata)}")
    elif qdata.shape != (n, blocks, group_size // 2) and qdata.shape != (n, blocks * group_size // 2):
        raise InputError(f"{fn}: expected qdata [{n}, {blocks}, {group_size // 2}] or [{n}, {blocks * group_size // 2}] "
                         f"for scales {_shape(scales)} and group size {group_size}, found qdata {_shape(qdata)}")
    if zero_points is not None:
        _check(fn, "zero_points", zero_points, torch.uint8, (2,))
        if zero_points.shape != scales.shape:
            raise InputError(f"{fn}: expected zero_points {_shape(scales)} like the scales, "
                             f"found {_shape(zero_points)}")
    return n, blocks * group_size


# ---- the kernels ----

def _flags(x: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> int:
    """The AVX2 kernels' dtype flags (bias: only a fused one, see `_avx2_bias`)."""
    return ((X_BF16 if x.dtype == torch.bfloat16 else 0)
            | (SCALES_BF16 if scales is not None and scales.dtype == torch.bfloat16 else 0)
            | (BIAS_BF16 if bias is not None and bias.dtype == torch.bfloat16 else 0))


def _avx2_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias the AVX2 kernels add themselves: a contiguous bf16 or fp32 one (else None)."""
    return bias if bias is not None and bias.dtype in FLOATS and bias.is_contiguous() else None


def _avx2_threads(n: int, k: int) -> int:
    return torch.get_num_threads() if n * k >= PARALLEL_WEIGHTS else 1


def _avx2_done(y: torch.Tensor, bias: torch.Tensor | None, fused: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None or fused is not None else y.add_(bias)


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`x [M, K] @ (qdata [N, K] * scales[:, None]).T + bias [N]` in x's dtype (all CPU and
    contiguous; x and `scales [N]` bf16, or with the AVX2 kernels bf16 or fp32), or None when
    the kernel is unavailable, takes no such dtypes, K is not a multiple of 32, or K is over
    `MAX_K`. Raises InputError for arguments that do not fit together."""
    _check("int8_linear", "x", x, FLOATS, (2,))
    _check("int8_linear", "qdata", qdata, torch.int8, (2,))
    _check("int8_linear", "scales", scales, FLOATS, (1,))
    (m, k), n = x.shape, qdata.shape[0]
    _check_width("int8_linear", x, n, qdata.shape[1])
    if scales.shape != (n,):
        raise InputError(f"int8_linear: expected scales [{n}] for weight {_shape(qdata)}, found {_shape(scales)}")
    _check_bias("int8_linear", bias, n)
    lib = library()
    if lib is None or k % 32 or k > MAX_K or x.numel() == 0 or n == 0:
        return None
    y = torch.empty(m, n, dtype=x.dtype)
    threads = torch.get_num_threads()
    if _is_avx2(lib):
        fused = _avx2_bias(bias)
        if lib.pangu_avx2_int8_linear(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), _ptr(fused), y.data_ptr(),
                                      m, n, k, _flags(x, scales, fused), _avx2_threads(n, k)) != 0:
            return None
        return _avx2_done(y, bias, fused)
    if x.dtype != torch.bfloat16 or scales.dtype != torch.bfloat16:
        return None
    if lib.pangu_int8_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), y.data_ptr(), m, n, k,
                                  threads) != 0:
        return None
    return y if bias is None else y.add_(bias)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@functools.cache
def bf16_fits(k: int) -> bool:
    """True when `bf16_linear` takes an input width of `k`."""
    return k % 32 == 0 and bf16_kernels()


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`x [M, K] @ weight [N, K].T + bias [N]` in x's dtype (weight bf16, x bf16 or with the
    AVX2 kernels fp32, CPU, contiguous), or None when the kernel is unavailable, does not take
    x's dtype, or K is not a multiple of 32. Raises InputError for arguments that do not fit
    together."""
    _check("bf16_linear", "x", x, FLOATS, (2,))
    _check("bf16_linear", "weight", weight, torch.bfloat16, (2,))
    (m, k), n = x.shape, weight.shape[0]
    _check_width("bf16_linear", x, n, weight.shape[1])
    _check_bias("bf16_linear", bias, n)
    if not bf16_fits(k) or x.numel() == 0 or n == 0:
        return None
    lib, threads = library(), torch.get_num_threads()
    y = torch.empty(m, n, dtype=x.dtype)
    if _is_avx2(lib):
        fused = _avx2_bias(bias)
        if lib.pangu_avx2_bf16_linear(x.data_ptr(), weight.data_ptr(), _ptr(fused), y.data_ptr(), m, n, k,
                                      _flags(x, None, fused), _avx2_threads(n, k)) != 0:
            return None
        return _avx2_done(y, bias, fused)
    if x.dtype != torch.bfloat16:
        return None
    if lib.pangu_bf16_linear(x.data_ptr(), weight.data_ptr(), _bias_ptr(bias), y.data_ptr(), m, n, k, threads) != 0:
        return None
    return _add_unfused(y, bias)


def f32_kernels() -> bool:
    """True where `f32_linear` runs (the AVX2 library builds here: `step_library`)."""
    return step_library() is not None


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`x [M, K] @ weight [N, K].T + bias [N]` for fp32 x and a row-major fp32 weight (CPU,
    contiguous), or None when the AVX2 library does not run here or K is not a multiple of 32.
    One thread streams a row-major weight at 28 GB/s here against 16-24 for the column-major
    split-K product (which is why `params.decode_layout` keeps fp32 weights row-major where this
    runs). Raises InputError for arguments that do not fit together."""
    _check("f32_linear", "x", x, torch.float32, (2,))
    _check("f32_linear", "weight", weight, torch.float32, (2,))
    (m, k), n = x.shape, weight.shape[0]
    _check_width("f32_linear", x, n, weight.shape[1])
    _check_bias("f32_linear", bias, n)
    lib = step_library()
    if lib is None or k % 32 or x.numel() == 0 or n == 0:
        return None
    y = torch.empty(m, n)
    fused = _avx2_bias(bias)
    if lib.pangu_avx2_f32_linear(x.data_ptr(), weight.data_ptr(), _ptr(fused), y.data_ptr(), m, n, k,
                                 _flags(x, None, fused), _avx2_threads(n, k)) != 0:
        return None
    return _avx2_done(y, bias, fused)


def _bias_ptr(bias: torch.Tensor | None) -> int:
    """The bias the kernels add themselves: a contiguous bf16 one (0: none)."""
    fused = bias is not None and bias.dtype == torch.bfloat16 and bias.is_contiguous()
    return bias.data_ptr() if fused else 0


def _add_unfused(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None or _bias_ptr(bias) else y.add_(bias)


# The bf16 kernel beats F.linear while the activations fit in half of L1 (16 KiB): at
# 3072 x 768, 16 rows 0.35 vs 0.44 ms; at 768 x 3072, 8 rows 0.41 vs 0.28 ms (two threads).
BF16_MAX_ELEMENTS = 8192


def dense_bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`x [..., K] @ weight [N, K].T + bias` through `bf16_linear` where it applies: x and the
    weight bf16 on the CPU, at most `BF16_MAX_ELEMENTS` activations, a contiguous weight, and
    eager inference (no autograd, no tracing); else None. Raises InputError when x's width is
    not K."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu" or x.numel() > BF16_MAX_ELEMENTS or not weight.is_contiguous()
            or weight.dim() != 2 or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()):
        return None
    _check_width("linear", x, *weight.shape)
    y = bf16_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return None if y is None else y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def int4_fits(k: int, group_size: int) -> bool:
    """True when `int4_linear` takes an input width of `k` with groups of `group_size`."""
    return (k % 128 == 0 and k % group_size == 0 and (group_size in (32, 64) or group_size % 128 == 0)
            and bf16_kernels())


def int4_tiles_fit(n: int, k: int, group_size: int) -> bool:
    """True where the leaves hold int4 weights `[n, k]` as AVX2 tiles (`quant.packing.to_tiles`):
    the AVX2 kernels run here, G % 32 == 0 and k % G == 0."""
    return avx2() and group_size % 32 == 0 and k % group_size == 0 and n > 0


def int4_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`x [M, K]` times the int4 weight whose MatMulNBits bytes are `qdata` (`[N, K/G, G/2]` or
    `[N, K/2]` uint8) or whose AVX2 tiles it is (`[ceil(N/8), K/8, 8, 4]`), `scales [N, K/G]` and
    `zero_points [N, K/G]` uint8 or None (zero 8), plus `bias [N]`, in x's dtype (x and scales
    bf16, or with the AVX2 kernels bf16 or fp32; all CPU and contiguous), or None when the kernel
    is unavailable, does not take these dtypes, or (K, G) do not fit. Tiles round x to int8 per
    block of 32 (as llama.cpp's q4_0 x q8_0 does); they run wherever the AVX2 library builds.
    Raises InputError for arguments that do not fit together."""
    _check("int4_linear", "x", x, FLOATS, (2,))
    n, k = _check_int4("int4_linear", qdata, scales, zero_points, group_size)
    _check_width("int4_linear", x, n, k)
    _check_bias("int4_linear", bias, n)
    if qdata.dim() == 4:
        return _int4_tiles_linear(x, qdata, scales, zero_points, group_size, bias, n, k)
    if not int4_fits(k, group_size) or x.numel() == 0 or n == 0:
        return None
    lib, threads = library(), torch.get_num_threads()
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    if _is_avx2(lib):
        fused = _avx2_bias(bias)
        if lib.pangu_avx2_int4_linear(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), _ptr(zero_points),
                                      _ptr(fused), y.data_ptr(), x.shape[0], n, k, group_size,
                                      _flags(x, scales, fused), _avx2_threads(n, k)) != 0:
            return None
        return _avx2_done(y, bias, fused)
    if x.dtype != torch.bfloat16 or scales.dtype != torch.bfloat16:
        return None
    if lib.pangu_int4_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), _ptr(zero_points),
                                  _bias_ptr(bias), y.data_ptr(), x.shape[0], n, k, group_size, threads) != 0:
        return None
    return _add_unfused(y, bias)


def _int4_tiles_linear(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                       group_size: int, bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor | None:
    lib = step_library()
    if lib is None or group_size % 32 or k % group_size or x.numel() == 0:
        return None
    y = torch.empty(x.shape[0], n, dtype=x.dtype)
    fused = _avx2_bias(bias)
    if lib.pangu_avx2_int4t_linear(x.data_ptr(), tiles.data_ptr(), scales.data_ptr(), _ptr(zero_points), _ptr(fused),
                                   y.data_ptr(), x.shape[0], n, k, group_size, _flags(x, scales, fused),
                                   _avx2_threads(n, k)) != 0:
        return None
    return _avx2_done(y, bias, fused)


def int4_dequantize(qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    group_size: int) -> torch.Tensor | None:
    """The bf16 weight `[N, K]` of MatMulNBits bytes `qdata [N, K/G, G/2]` with bf16 `scales` and
    uint8 `zero_points` `[N, K/G]` (or None: zero 8), all CPU and contiguous; None when the
    AVX-512 kernel is unavailable (it has no AVX2 version), the scales are not bf16, or G is not a
    multiple of 32. Raises InputError for arguments that do not fit together."""
    n, k = _check_int4("int4_dequantize", qdata, scales, zero_points, group_size)
    if (not bf16_kernels() or avx2() or scales.dtype != torch.bfloat16 or group_size % 32 or n * k == 0
            or qdata.dim() == 4):
        return None
    w = torch.empty(n, k, dtype=torch.bfloat16)
    zeros = 0 if zero_points is None else zero_points.data_ptr()
    if library().pangu_int4_dequantize_bf16(qdata.data_ptr(), scales.data_ptr(), zeros, w.data_ptr(), n, k,
                                            group_size, torch.get_num_threads()) != 0:
        return None
    return w


# ---- where the library comes from ----

def _unsupported() -> str | None:
    if os.environ.get("PANGU_FN_NATIVE", "1") == "0":
        return "PANGU_FN_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86-64, found {platform.system()} on {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX512", "AVX2"):
        return f"needs AVX-512 or AVX2, torch reports {capability} on this CPU"
    return None


def _load(isa: str | None = None) -> ctypes.CDLL:
    """Build (or find) the library (`isa`: "avx2", else the best this CPU and compiler take)
    and load it; a cached file that fails to load is rebuilt once. Raises BuildError with the
    reason."""
    path, origin = _build(isa=isa)
    try:
        return _open(path, origin)
    except OSError as e:
        if origin != "cached":
            raise BuildError(f"load failed: {e}") from e
    path, origin = _build(rebuild=True, isa=isa)
    try:
        return _open(path, origin)
    except OSError as e:
        raise BuildError(f"load failed after rebuilding {path.name}: {e}") from e


def _open(path: Path, origin: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    finally:
        if origin == "private":  # loaded (or not): the private folder is not kept
            shutil.rmtree(path.parent, ignore_errors=True)


def _build(rebuild: bool = False, isa: str | None = None) -> tuple[Path, str]:
    """(path of the shared library for this source, compiler and target, where it came from:
    "cached", "built" into the cache, or "private": built in a fresh temporary folder because
    the cache folder or file is not trusted). `rebuild` replaces a cached file. Raises BuildError."""
    compiler = os.environ.get("CC", "cc")
    key, sources = _cache_key(compiler, isa)
    name = f"{sources[0].stem}-{key}.so"
    cache = _cache_folder()
    if cache is None:
        return _compile(compiler, sources, Path(tempfile.mkdtemp(prefix="pangu_fn-")) / name), "private"
    lib = cache / name
    with _locked(cache / "build.lock"):
        if lib.exists() or lib.is_symlink():
            why = _untrusted(lib)
            if why is not None:
                _notes.append(f"cached {lib.name} {why}: built in a private temporary folder")
                return _compile(compiler, sources, Path(tempfile.mkdtemp(prefix="pangu_fn-")) / name), "private"
            if not rebuild:
                return lib, "cached"
        return _compile(compiler, sources, lib), "built"


def _cache_key(compiler: str, only: str | None = None) -> tuple[str, tuple[Path, ...]]:
    """(hash of the sources, the flags, the compiler (path, `--version`) and the macros it
    predefines for these flags (`-march=native`: this CPU's instruction sets), the sources to
    build: AVX-512 where torch reports it and the compiler targets it, else AVX2; `only`: that
    ISA's). Raises BuildError without a usable compiler, or when it does not target them here."""
    version = _run([compiler, "--version"])
    macros = set(_run([compiler, *FLAGS, "-dM", "-E", "-x", "c", os.devnull]).split())
    isas = ("avx512", "avx2") if torch.backends.cpu.get_cpu_capability() == "AVX512" else ("avx2",)
    isas = isas if only is None else (only,)
    isa = next((i for i in isas if all(m in macros for m in NEEDS[i])), None)
    if isa is None:
        wanted = " or ".join("+".join(NEEDS[i]) for i in isas)
        raise BuildError(f"{compiler} does not target {wanted} with {' '.join(FLAGS)}")
    parts = [*(f.read_bytes() for f in SOURCES[isa]), " ".join(FLAGS).encode(), str(shutil.which(compiler) or compiler).encode(),
             version.encode(), " ".join(sorted(macros)).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16], SOURCES[isa]


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"build failed: {e}") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"{command[0]} exited with {done.returncode}"])[-1]
        raise BuildError(f"build failed: {last}")
    return done.stdout


def _cache_folder() -> Path | None:
    """`$PANGU_FN_CACHE` (default `~/.cache/pangu_fn`), created or tightened to mode 0700, or
    None when it cannot be made or another user owns it."""
    try:
        folder = Path(os.environ.get("PANGU_FN_CACHE") or Path.home() / ".cache" / "pangu_fn")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.stat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            _notes.append(f"cache folder {folder} is not yours: built in a private temporary folder")
            return None
        if stat.S_IMODE(info.st_mode) != 0o700:
            folder.chmod(0o700)
    except (OSError, RuntimeError) as e:  # RuntimeError: Path.home() without a home
        _notes.append(f"cache folder unusable ({e}): built in a private temporary folder")
        return None
    return folder


def _untrusted(path: Path) -> str | None:
    """Why a cached library must not be loaded (a link, not a file, another owner, writable
    by others), or None."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}"
    if info.st_mode & 0o022:
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (so two processes do not compile at once)."""
    import fcntl  # POSIX only, like the kernels

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _compile(compiler: str, sources: tuple[Path, ...], lib: Path) -> Path:
    """Compile into a temporary name beside `lib`, make it owner-only (0700), rename it to `lib`."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        _run([compiler, *FLAGS, *map(str, sources), "-o", tmp])
        os.chmod(tmp, 0o700)
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib
