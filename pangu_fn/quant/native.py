"""A weight-only int8 kernel for x86-64 CPUs with AVX-512, compiled from C on first use.

torch's `_weight_int8pack_mm` moves 12-14 GB/s of int8 weights here with two threads, about
half of what the memory delivers, so int8 decoding ran little faster than bf16.
`native_int8.c` converts 16 weights at a time to fp32 and multiplies up to 4 rows of bf16
activations per pass (20-29 GB/s at GPT-2-small's shapes, two threads). It is compiled once
per machine with the system C compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`) into
`$PANGU_FN_CACHE` (default `~/.cache/pangu_fn`), loaded with ctypes after torch, so its OpenMP
threads are torch's own, and used for CPU int8 leaves with bf16 activations and an input
width divisible by 32, up to `MAX_K`. Without Linux on x86-64 with AVX-512F, without a compiler, or with
`PANGU_FN_NATIVE=0`, `int8_kernel()` is None and the torch kernels run; `status()` says why.
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

SOURCE = Path(__file__).with_name("native_int8.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_reason: list[str] = []


def status() -> str:
    """"native int8 kernel: on" or why it is off (after the first `int8_kernel()` call)."""
    kernel = int8_kernel()
    return "native int8 kernel: on" if kernel is not None else f"native int8 kernel: off ({_reason[0]})"


@functools.cache
def int8_kernel() -> ctypes._CFuncPtr | None:
    """The compiled `pangu_int8_linear_bf16`, or None where it cannot run (see the module doc)."""
    why = _unsupported()
    if why is None:
        try:
            lib = ctypes.CDLL(str(_build()))
        except (OSError, subprocess.SubprocessError) as e:
            why = f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        else:
            fn = lib.pangu_int8_linear_bf16
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            return fn
    _reason.append(why)
    return None


# Above this input width torch's kernel is faster: a row of fp32 activations (4K bytes) no
# longer stays in L1 beside the streamed weights (two threads, timed in turns: 2048 x 8192 12 vs
# 16 GB/s; 2048 x 2048 21 vs 14 GB/s; 768 x 3072 20 vs 16 GB/s).
MAX_K = 4096


def int8_linear(x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`x [M, K] @ (qdata [N, K] * scales [N, 1]).T` in bf16 (x, scales bf16 CPU, contiguous),
    or None when the kernel is unavailable, K is not a multiple of 32, or K is over `MAX_K`."""
    kernel = int8_kernel()
    m, k = x.shape
    if kernel is None or k % 32 or k > MAX_K:
        return None
    y = torch.empty(m, qdata.shape[0], dtype=torch.bfloat16)
    if kernel(x.data_ptr(), qdata.data_ptr(), scales.data_ptr(), y.data_ptr(), m, qdata.shape[0], k,
              torch.get_num_threads()) != 0:
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
    lib = cache / f"native_int8-{key.hexdigest()[:16]}.so"
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
