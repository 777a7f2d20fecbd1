"""Weight-only int8 and int4 kernels for x86-64 CPUs with AVX-512, compiled from C on first use.

torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` move 12-14 GB/s of weights
here with two threads, about half of what the memory delivers, so quantized decoding gained
less than its bytes promise. `native_kernels.c` converts 16 weights at a time to fp32 and
multiplies up to 4 rows of bf16 activations per pass over the weights (int8: 23-29 GB/s at
GPT-2-small's shapes, two threads); its int4 kernel reads the ONNX MatMulNBits layout the leaf
stores, so no second packed copy is made. The library is compiled once per machine with the
system C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`) into `$PANGU_FN_CACHE`
(default `~/.cache/pangu_fn`) and loaded with ctypes after torch, so its OpenMP threads are
torch's own. Without Linux on x86-64 with AVX-512F, without a compiler, or with
`PANGU_FN_NATIVE=0`, `library()` is None and the torch kernels run; `status()` says why.
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


def status() -> str:
    """"native int8/int4 kernels: on" or why they are off."""
    return "native int8/int4 kernels: on" if library() is not None else f"native int8/int4 kernels: off ({_reason[0]})"


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
            ptr, i64 = ctypes.c_void_p, ctypes.c_int64
            lib.pangu_int8_linear_bf16.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int]
            lib.pangu_int4_linear_bf16.argtypes = [ptr] * 5 + [i64] * 4 + [ctypes.c_int]
            return lib
    _reason.append(why)
    return None


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`x [M, K] @ (qdata [N, K] * scales[:, None]).T` in bf16 (x, scales bf16; all contiguous
    on the CPU), or None when the kernels are unavailable or K is not a multiple of 32."""
    lib = library()
    m, k = x.shape
    if lib is None or k % 32:
        return None
    y = torch.empty(m, qdata.shape[0], dtype=torch.bfloat16)
    if lib.pangu_int8_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), y.data_ptr(),
                                  m, qdata.shape[0], k, torch.get_num_threads()) != 0:
        return None
    return y


def int4_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                group_size: int) -> torch.Tensor | None:
    """`x [M, K]` times the transposed int4 weight held as MatMulNBits `qdata [N, K/G, G/2]`,
    `scales [N, K/G]` (bf16) and `zero_points [N, K/G]` uint8 or None (8), in bf16 (all
    contiguous on the CPU); None when the kernels are unavailable or G is not a multiple of 32."""
    lib = library()
    m, k = x.shape
    if lib is None or group_size % 32:
        return None
    n = qdata.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    zeros = None if zero_points is None else zero_points.data_ptr()
    if lib.pangu_int4_linear_bf16(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), zeros, y.data_ptr(),
                                  m, n, k, group_size, torch.get_num_threads()) != 0:
        return None
    return y


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
