"""Weight-streaming kernels for x86-64 CPUs with AVX-512, compiled from C on first use.

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

Each takes up to 8 activation rows (bf16: 6, int8: 4) per pass over the weight. The library is compiled
once per machine with the system C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`)
into `$PANGU_FN_CACHE` (default `~/.cache/pangu_fn`), loaded with ctypes after torch, so its
OpenMP threads are torch's own. Without Linux on x86-64 with AVX-512F (and AVX512-BF16 for the
bf16 and int4 kernels), without a compiler, or with `PANGU_FN_NATIVE=0`, the functions return
None and the callers use torch's kernels; `status()` says which kernels run and why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_reason: list[str] = []

# Above this input width torch's int8 kernel is faster: a row of fp32 activations (4K bytes) no
# longer stays in L1 beside the streamed weights (two threads, timed in turns: 2048 x 8192 12 vs
# 16 GB/s; 2048 x 2048 21 vs 14 GB/s; 768 x 3072 20 vs 16 GB/s).
MAX_K = 4096


def status() -> str:
    """Which native kernels run here, or why none does (loads the library if needed)."""
    lib = library()
    if lib is None:
        return f"native kernels: off ({_reason[0]})"
    if not _has_bf16(lib):
        return "native kernels: int8 (no AVX512-BF16: bf16 and int4 use torch's)"
    return "native kernels: int8, bf16, int4"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (see the module doc)."""
    why = _unsupported()
    if why is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as e:
            why = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        else:
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


def forget() -> None:
    """Drop the loaded library and the cached answers, so that the next call looks again
    (after changing `PANGU_FN_NATIVE`, `CC` or `PANGU_FN_CACHE`)."""
    for cached in (library, bf16_kernels, bf16_fits, int4_fits):
        cached.cache_clear()
    _reason.clear()


def _has_bf16(lib: ctypes.CDLL) -> bool:
    return bool(lib.pangu_native_has_bf16())


@functools.cache
def bf16_kernels() -> bool:
    """True where the bf16 and int4 kernels run."""
    lib = library()
    return lib is not None and _has_bf16(lib)


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`x [M, K] @ (qdata [N, K] * scales [N, 1]).T` in bf16 (x, scales bf16 CPU, contiguous),
    or None when the kernel is unavailable, K is not a multiple of 32, or K is over `MAX_K`."""
    lib = library()
    m, k = x.shape
    if lib is None or k % 32 or k > MAX_K:
        return None
    y = torch.empty(m, qdata.shape[0], dtype=torch.bfloat16)
    if lib.pangu_int8_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), y.data_ptr(), m,
                                  qdata.shape[0], k, torch.get_num_threads()) != 0:
        return None
    return y


@functools.cache
def bf16_fits(k: int) -> bool:
    """True when `bf16_linear` takes an input width of `k`."""
    return k % 32 == 0 and bf16_kernels()


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """`x [M, K] @ weight [N, K].T + bias [N]` in bf16 (x and weight bf16 CPU, contiguous), or
    None when the kernel is unavailable or K is not a multiple of 32."""
    m, k = x.shape
    if not bf16_fits(k):
        return None
    y = torch.empty(m, weight.shape[0], dtype=torch.bfloat16)
    if library().pangu_bf16_linear(x.data_ptr(), weight.data_ptr(), _bias_ptr(bias), y.data_ptr(), m,
                                   weight.shape[0], k, torch.get_num_threads()) != 0:
        return None
    return _add_unfused(y, bias)


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
    eager inference (no autograd, no tracing); else None."""
    if (x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.device.type != "cpu" or x.numel() > BF16_MAX_ELEMENTS or not weight.is_contiguous()
            or torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return None
    y = bf16_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return None if y is None else y.view(*x.shape[:-1], weight.shape[0])


@functools.cache
def int4_fits(k: int, group_size: int) -> bool:
    """True when `int4_linear` takes an input width of `k` with groups of `group_size`."""
    return (k % 128 == 0 and k % group_size == 0 and (group_size in (32, 64) or group_size % 128 == 0)
            and bf16_kernels())


def int4_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`x [M, K]` times the int4 weight whose MatMulNBits bytes are `qdata` (`[N, K/G, G/2]` or
    `[N, K/2]` uint8), `scales [N, K/G]` bf16 and `zero_points [N, K/G]` uint8 or None (zero 8),
    plus `bias [N]`, in bf16 (x and scales bf16, all CPU and contiguous), or None when the kernel
    is unavailable or (K, G) do not fit."""
    m, k = x.shape
    if not int4_fits(k, group_size):
        return None
    n = qdata.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    zeros = 0 if zero_points is None else zero_points.data_ptr()
    if library().pangu_int4_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), zeros, _bias_ptr(bias),
                                        y.data_ptr(), m, n, k, group_size, torch.get_num_threads()) != 0:
        return None
    return _add_unfused(y, bias)


def int4_dequantize(qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                    group_size: int) -> torch.Tensor | None:
    """The bf16 weight `[N, K]` of MatMulNBits bytes `qdata [N, K/G, G/2]` with bf16 `scales` and
    uint8 `zero_points` `[N, K/G]` (or None: zero 8), all CPU and contiguous; None when the
    kernel is unavailable or G is not a multiple of 32."""
    n, blocks = scales.shape
    k = blocks * group_size
    if not bf16_kernels() or group_size % 32:
        return None
    w = torch.empty(n, k, dtype=torch.bfloat16)
    zeros = 0 if zero_points is None else zero_points.data_ptr()
    if library().pangu_int4_dequantize_bf16(qdata.data_ptr(), scales.data_ptr(), zeros, w.data_ptr(), n, k,
                                            group_size, torch.get_num_threads()) != 0:
        return None
    return w


def _unsupported() -> str | None:
    if os.environ.get("PANGU_FN_NATIVE", "1") == "0":
        return "PANGU_FN_NATIVE=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"needs Linux on x86-64, found {platform.system()} on {platform.machine()}"
    flags = _cpu_flags()
    if "avx512f" not in flags:
        return "this CPU has no AVX-512F"
    return None


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build() -> Path:
    """The shared library for this source, compiler flags and CPU, compiled unless cached."""
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, *sorted(_cpu_flags())]).encode())
    cache = Path(os.environ.get("PANGU_FN_CACHE", Path.home() / ".cache" / "pangu_fn"))
    lib = cache / f"native_kernels-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=False, capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr or f"{compiler} exited with {done.returncode}")
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib
