"""Quantized weight leaves: what a params tree holds in place of a float `[N, K]` weight.

Each leaf knows its original `shape`, `numel()`, stored `nbytes`, a `scheme` name for reports,
its `compute_dtype` (the activations' dtype; scales are kept in it), `dequantize()`,
`linear(x, bias)` (kernel choice in `kernels.py`), `embedding(tokens)` (for a quantized tied
embedding), `.to(device)`, `.astype(dtype)`, and the save protocol of `pangu_fn.io.leaves`.

Leaves are values: nothing a leaf holds changes after it is made, so threads may share a tree.
Machine-specific copies are never saved. The CPU ones (torch's int4 pack, oneDNN's blocked bf16
weight) are made with the leaf (not while tracing); the CUDA and NPU packs on first use, each
built once under a lock and only then published. Where the native kernels run (`native.py`),
no CPU copy is needed: they read the stored layout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import native
from ..errors import FormatError, ShapeError
from ..io.leaves import register_leaf
from . import kernels
from .packing import (
    CPU_ROW_MULTIPLE,
    cpu_layout_known,
    cpu_pack,
    cpu_row_block,
    cpu_unpack,
    from_matmul_nbits,
    from_tiles,
    to_matmul_nbits,
    to_tiles,
)
from .rtn import int4_dequantize

PACK_ROWS = 256  # rows per packing chunk: a multiple of the packer's row block (32 or 64)
FLOAT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _size(t: Any) -> int:
    if t is None:
        return 0
    if isinstance(t, (tuple, list)):
        return sum(_size(x) for x in t)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# held while a leaf builds a kernel copy on first use (CUDA / NPU packs), so that no thread
# sees a half-built one and none is built twice
_COPY_LOCK = threading.RLock()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ShapeError(message)


class _Leaf:
    """Behaviour shared by the leaf kinds."""

    shape: torch.Size
    compute_dtype: torch.dtype
    _copies: dict[str, Any]

    def _kernel_copy(self, key: str, build: Callable[[], Any]) -> Any:
        """The kernel copy `key` of this leaf, built by `build()` on first use, under a lock."""
        if key not in self._copies:
            with _COPY_LOCK:
                if key not in self._copies:
                    self._copies[key] = build()
        return self._copies[key]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored (saved) tensors."""
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    @property
    def resident_nbytes(self) -> int:
        """Bytes held in memory: the stored tensors plus kernel copies (CPU / NPU packs)."""
        return sum(_size(t) for t in self._held())

    def _held(self) -> list[Any]:
        raise NotImplementedError

    def to_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.scheme}, shape={list(self.shape)}, compute={self.compute_dtype})"

    @classmethod
    def _parts(cls, tensors: dict[str, torch.Tensor], description: dict[str, Any],
               required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """The stored tensors, checked: a dict description, the expected names, tensors only."""
        if not isinstance(description, dict):
            raise FormatError(f"{cls.kind} leaf: expected a description object, found {type(description).__name__}")
        missing = [k for k in required if k not in tensors]
        extra = [k for k in tensors if k not in required + optional]
        if missing or extra:
            raise FormatError(f"{cls.kind} leaf: expected tensors {list(required + optional)}, "
                              f"found {sorted(tensors)} (description {description})")
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"{cls.kind} leaf: expected tensor {name!r}, found {type(t).__name__}")
        return tensors

    @classmethod
    def _flag(cls, description: dict[str, Any], key: str) -> bool:
        value = description.get(key, False)
        if not isinstance(value, bool):
            raise FormatError(f"{cls.kind} leaf: expected {key!r} true or false in its description, found {value!r}")
        return value

    @classmethod
    def _made(cls, make: Callable[[], _Leaf], description: dict[str, Any]) -> _Leaf:
        """`make()`, with a tensor mismatch reported as FormatError, and the description's
        `shape` (when given) checked against the leaf's."""
        try:
            leaf = make()
        except ShapeError as e:
            raise FormatError(f"{cls.kind} leaf: {e}") from e
        shape = description.get("shape")
        if shape is not None and shape != list(leaf.shape):
            raise FormatError(f"{cls.kind} leaf: its description says shape {shape!r}, its tensors make "
                              f"{list(leaf.shape)}")
        return leaf


@register_leaf
class Int8Weight(_Leaf):
    """Per-output-channel symmetric int8: `qdata` int8 `[N, K]`, `scales [N]` (compute dtype);
    weight = qdata * scales[:, None]."""

    kind = "int8"

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor) -> None:
        _need(qdata.dim() == 2 and qdata.dtype == torch.int8,
              f"Int8Weight: expected qdata int8 [N, K], found {qdata.dtype} {list(qdata.shape)}")
        _need(scales.shape == (qdata.shape[0],) and scales.is_floating_point(),
              f"Int8Weight: expected float scales [{qdata.shape[0]}], found {scales.dtype} {list(scales.shape)}")
        self.qdata, self.scales = qdata.contiguous(), scales.contiguous()  # kernels need row-major
        self.shape = torch.Size(qdata.shape)
        self.compute_dtype = scales.dtype
        self._copies = {}

    @property
    def scheme(self) -> str:
        return "int8"

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The weight `[N, K]` (or its `rows`) in `dtype` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        q, s = self.qdata[rows], self.scales[rows]
        if dtype == s.dtype:  # one pass: int8 * scale, promoted and rounded once
            return torch.mul(q, s[:, None])
        return (q.float() * s.float()[:, None]).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.int8_linear(self, x, bias)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows `tokens` of the weight, `[..., K]` in the compute dtype (tied embeddings)."""
        return (self.qdata[tokens].float() * self.scales[tokens].float()[..., None]).to(self.compute_dtype)

    def npu_kernel_data(self, dtype: torch.dtype) -> tuple:
        return self._kernel_copy(f"npu-{dtype}", lambda: kernels.npu_int8_data(self, dtype))

    def _held(self) -> list[Any]:
        return [self.qdata, self.scales, *self._copies.values()]

    def to(self, device: str | torch.device) -> Int8Weight:
        return Int8Weight(self.qdata.to(device), self.scales.to(device))

    def astype(self, dtype: torch.dtype) -> Int8Weight:
        return Int8Weight(self.qdata, self.scales.to(dtype))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"qdata": self.qdata, "scales": self.scales}

    def describe(self) -> dict[str, Any]:
        return {"scheme": "int8", "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Int8Weight:
        t = cls._parts(tensors, description, ("qdata", "scales"))
        return cls._made(lambda: cls(t["qdata"], t["scales"]), description)


@register_leaf
class Int4Weight(_Leaf):
    """Group-wise 4-bit, ONNX MatMulNBits layout: `qdata` uint8 `[N, K/G, G/2]` (two codes per
    byte along K, low nibble first), `scales [N, K/G]` (compute dtype), `zero_points` uint8
    `[N, K/G]` (values 0..15) or None for symmetric (zero point 8); weight = (code - zero) * scale.

    On the CPU with bf16 compute (or fp32 with the AVX2 kernels) the native int4 kernel reads
    `qdata` as it is; with bf16 compute where the AVX2 kernels run and G % 32 == 0, the leaf
    holds the AVX2 tiles instead (`packing.to_tiles`: 8 rows per load, activations rounded to
    int8 per 32 as llama.cpp's q4_0 does, 2x the int16 route's speed; fp32 compute keeps fp32
    activations). Where no native kernel runs, it holds torch's CPU kernel's packed copy. Either
    copy takes the place of `qdata` (rebuilt on demand, e.g. for saving) when its layout is
    invertible here, unless `keep_qdata`; a tied embedding's token lookup then
    unpacks only the row blocks it needs. The tensors passed in are never written."""

    kind = "int4"

    def __init__(self, qdata: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 group_size: int, keep_qdata: bool = False) -> None:
        _need(qdata.dim() == 3 and qdata.dtype == torch.uint8 and qdata.shape[2] * 2 == group_size,
              f"Int4Weight: expected qdata uint8 [N, K/G, G/2] with G = {group_size}, "
              f"found {qdata.dtype} {list(qdata.shape)}")
        n, blocks = qdata.shape[0], qdata.shape[1]
        _need(scales.shape == (n, blocks) and scales.is_floating_point(),
              f"Int4Weight: expected float scales [{n}, {blocks}], found {scales.dtype} {list(scales.shape)}")
        _need(zero_points is None or (zero_points.shape == (n, blocks) and zero_points.dtype == torch.uint8),
              f"Int4Weight: expected uint8 zero_points [{n}, {blocks}], found "
              f"{None if zero_points is None else (zero_points.dtype, list(zero_points.shape))}")
        self.scales = scales.contiguous()
        self.zero_points = None if zero_points is None else zero_points.contiguous()
        self.group_size = int(group_size)
        self.keep_qdata = keep_qdata
        self.shape = torch.Size((n, blocks * group_size))
        self.compute_dtype = scales.dtype
        self._copies = {}
        qdata = qdata.contiguous()
        on_cpu = qdata.device.type == "cpu" and self.compute_dtype in native.activation_dtypes()
        tiled = (on_cpu and self.compute_dtype == torch.bfloat16
                 and native.int4_tiles_fit(n, self.shape[1], self.group_size))
        self._tiles = self._tile(qdata) if tiled else None
        native_runs = self._tiles is not None or (on_cpu and native.int4_fits(self.shape[1], self.group_size))
        kernel_data = qdata if self._tiles is None else self._tiles
        self._native = (kernel_data, self.scales, self.zero_points) if native_runs else None
        self._cpu, invertible = (None, False) if native_runs else self._cpu_pack(qdata)
        invertible = invertible or self._tiles is not None
        self._qdata = None if invertible and not keep_qdata else qdata

    def _tile(self, qdata: torch.Tensor) -> torch.Tensor | None:
        """The AVX2 tiles of `qdata`, made PACK_ROWS rows at a time (small staging copies); None
        while tracing."""
        if kernels.tracing():
            return None
        n, k = self.shape
        tiles = torch.empty((n + 7) // 8, k // 8, 8, 4, dtype=torch.uint8)
        for r0 in range(0, n, PACK_ROWS):
            tiles[r0 // 8:(r0 + PACK_ROWS) // 8] = to_tiles(from_matmul_nbits(qdata[r0:r0 + PACK_ROWS]))
        return tiles

    def _cpu_pack(self, qdata: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, bool]:
        """((packed weight, `scales_and_zeros [K/G, N, 2]`) for torch's CPU kernel or None where
        it does not apply, whether `cpu_unpack` recovers the codes from the pack). Rows are
        packed in chunks (whole row blocks of the packer), so the staging copies stay small."""
        if (qdata.device.type != "cpu" or self.compute_dtype != torch.bfloat16
                or self.group_size not in (32, 64, 128, 256) or kernels.tracing()):
            return None, False
        n, k = self.shape
        pad = -n % CPU_ROW_MULTIPLE
        packed = torch.empty(n + pad, k // 2, dtype=torch.uint8)
        invertible = cpu_layout_known()
        for r0 in range(0, n, PACK_ROWS):
            r1 = min(r0 + PACK_ROWS, n)
            codes = from_matmul_nbits(qdata[r0:r1])
            if r1 == n and pad:
                codes = torch.cat([codes, codes.new_full((pad, k), 8)])
            chunk = cpu_pack(codes)
            if invertible and r0 == 0:  # the layout probed once per process, confirmed on real rows
                invertible = torch.equal(cpu_unpack(chunk, len(codes), k), codes)
            packed[r0:r0 + len(codes)] = chunk
        return (packed, kernels.scales_and_zeros(self.scales, self.zero_points, pad)), invertible

    @property
    def native_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(qdata, scales, zero_points) for `native.int4_linear`, or None where it cannot run
        (another device or compute dtype, a (K, G) it does not take, or no native kernels)."""
        return self._native

    @property
    def cpu_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed weight, scales_and_zeros) for `_weight_int4pack_mm_for_cpu`, or None
        where that kernel does not apply (made with the leaf)."""
        return self._cpu

    @property
    def cuda_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed weight, scales_and_zeros) for torch's CUDA int4 kernel, or None where it does
        not apply (built on first use; the leaf then holds both copies)."""
        if self.scales.device.type != "cuda":
            return None
        return self._kernel_copy("cuda", lambda: kernels.cuda_int4_data(self))

    def codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """Codes `[N, K]` uint8 (0..15), or those of `rows` (a step-1 slice; when only the CPU
        pack is held, its start a multiple of the packer's row block, `cpu_row_block()`)."""
        if self._qdata is not None:
            return from_matmul_nbits(self._qdata[rows])
        n, k = self.shape
        r0, r1, _ = rows.indices(n)
        if self._tiles is not None:
            return from_tiles(self._tiles[r0 // 8:(r1 + 7) // 8])[r0 % 8:r0 % 8 + max(r1 - r0, 0)]
        end = n + (-n % CPU_ROW_MULTIPLE) if r1 == n else r1  # the last rows come with their padding
        return cpu_unpack(self._cpu[0][r0:end], end - r0, k)[: r1 - r0]

    @property
    def qdata(self) -> torch.Tensor:
        """The MatMulNBits data `[N, K/G, G/2]` uint8."""
        return self._qdata if self._qdata is not None else to_matmul_nbits(self.codes(), self.group_size)

    @property
    def scheme(self) -> str:
        return f"int4-g{self.group_size}-{'sym' if self.zero_points is None else 'asym'}"

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The weight `[N, K]` (or its `rows`, see `codes`) in `dtype` (default: the compute dtype)."""
        zeros = None if self.zero_points is None else self.zero_points[rows]
        dtype = dtype or self.compute_dtype
        if (dtype == torch.bfloat16 == self.scales.dtype and self._qdata is not None
                and self._qdata.device.type == "cpu" and not kernels.tracing()):
            w = native.int4_dequantize(self._qdata[rows], self.scales[rows], zeros, self.group_size)
            if w is not None:
                return w
        return int4_dequantize(self.codes(rows), self.scales[rows], zeros, dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.int4_linear(self, x, bias)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows `tokens` of the weight, `[..., K]` in the compute dtype (tied embeddings).
        When only the CPU pack is held, just the row blocks the tokens fall in are unpacked."""
        flat = tokens.reshape(-1)
        if self._qdata is not None:
            codes = from_matmul_nbits(self._qdata[flat])
        else:
            block = 8 if self._tiles is not None else cpu_row_block()  # known: a copy alone is held only then
            n = self.shape[0]
            starts = (flat // block * block).tolist()
            blocks = {s: self.codes(slice(s, min(s + block, n))) for s in set(starts)}
            codes = torch.stack([blocks[s][t - s] for t, s in zip(flat.tolist(), starts)])
        zeros = None if self.zero_points is None else self.zero_points[flat]
        rows = int4_dequantize(codes, self.scales[flat], zeros, self.compute_dtype)
        return rows.view(*tokens.shape, self.shape[1])

    def npu_kernel_data(self, dtype: torch.dtype) -> tuple:
        return self._kernel_copy(f"npu-{dtype}", lambda: kernels.npu_int4_data(self, dtype))

    def _held(self) -> list[Any]:
        return [self._qdata, self._tiles, self.scales, self.zero_points, self._cpu, *self._copies.values()]

    def to(self, device: str | torch.device) -> Int4Weight:
        if torch.device(device) == self.device:  # (leaves are never written: no copy, no re-layout)
            return self
        zp = None if self.zero_points is None else self.zero_points.to(device)
        return Int4Weight(self.qdata.to(device), self.scales.to(device), zp, self.group_size, self.keep_qdata)

    def astype(self, dtype: torch.dtype) -> Int4Weight:
        if dtype == self.compute_dtype:
            return self
        return Int4Weight(self.qdata, self.scales.to(dtype), self.zero_points, self.group_size, self.keep_qdata)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"qdata": self.qdata, "scales": self.scales}
        if self.zero_points is not None:
            out["zero_points"] = self.zero_points
        return out

    @property
    def nbytes(self) -> int:
        n, k = self.shape
        zp = 0 if self.zero_points is None else self.zero_points.numel()
        return n * k // 2 + self.scales.numel() * self.scales.element_size() + zp

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "shape": list(self.shape), "group_size": self.group_size,
                "keep_qdata": self.keep_qdata}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> Int4Weight:
        t = cls._parts(tensors, description, ("qdata", "scales"), ("zero_points",))
        group = description.get("group_size")
        if not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2:
            raise FormatError(f"int4 leaf: expected an even integer group_size >= 2 in its description, "
                              f"found {group!r}")
        keep = cls._flag(description, "keep_qdata")
        zeros = t.get("zero_points")
        if (zeros is not None and zeros.dtype == torch.uint8 and zeros.numel() and not kernels.tracing()
                and int(zeros.max()) > 15):  # (export rebuilds leaves from traced tensors)
            raise FormatError(f"int4 leaf: expected zero_points 0..15, found {int(zeros.max())}")
        return cls._made(lambda: cls(t["qdata"], t["scales"], zeros, group, keep), description)


@register_leaf
class DenseWeight(_Leaf):
    """A float weight `[N, K]` that runs through a faster kernel than `F.linear`: on the CPU a
    bf16 weight goes through the native bf16 kernel (`native.py`, the plain tensor) or, where
    that cannot run, is held as oneDNN's prepacked (blocked) copy, which multiplies one row of
    activations 2-3x faster than stock bf16 `F.linear`; the plain tensor is then kept too only
    with `keep_dense` (needed when the leaf is also an embedding table)."""

    kind = "dense"

    def __init__(self, weight: torch.Tensor, keep_dense: bool = False) -> None:
        _need(weight.dim() == 2 and weight.is_floating_point(),
              f"DenseWeight: expected a float [N, K] weight, found {weight.dtype} {list(weight.shape)}")
        self.shape = torch.Size(weight.shape)
        self.compute_dtype = weight.dtype
        self.keep_dense = keep_dense
        self.packed = kernels.mkldnn_prepack(weight)
        self._dense = weight.contiguous() if keep_dense or self.packed is None else None

    @property
    def weight(self) -> torch.Tensor:
        """The plain `[N, K]` tensor (unpacked on demand when only the packed copy is held)."""
        return self._dense if self._dense is not None else self.packed.to_dense()

    @property
    def scheme(self) -> str:
        return FLOAT_NAMES.get(self.compute_dtype, str(self.compute_dtype))

    @property
    def device(self) -> torch.device:
        return (self._dense if self._dense is not None else self.packed).device

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.to(dtype or self.compute_dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return kernels.dense_linear(self, x, bias)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight)

    def _held(self) -> list[Any]:
        return [self._dense]

    @property
    def resident_nbytes(self) -> int:
        packed = 0 if self.packed is None else self.nbytes  # oneDNN's copy: same element count
        return _size(self._dense) + packed

    def to(self, device: str | torch.device) -> DenseWeight:
        return DenseWeight(self.weight.to(device), self.keep_dense)

    def astype(self, dtype: torch.dtype) -> DenseWeight:
        return DenseWeight(self.weight.to(dtype), self.keep_dense)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    @property
    def nbytes(self) -> int:
        return self.numel() * torch.finfo(self.compute_dtype).bits // 8

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "shape": list(self.shape), "keep_dense": self.keep_dense}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], description: dict[str, Any]) -> DenseWeight:
        t = cls._parts(tensors, description, ("weight",))
        keep = cls._flag(description, "keep_dense")
        return cls._made(lambda: cls(t["weight"], keep), description)


def is_quantized(leaf: Any) -> bool:
    """True for any leaf this package makes (int8, int4, dense-packed)."""
    return isinstance(leaf, _Leaf)
