"""Quantized weight leaves: what a params tree holds in place of a float `[N, K]` weight.

Each leaf knows its original `shape`, `numel()`, stored `nbytes`, a `scheme` name for reports,
its `compute_dtype` (the activations' dtype; scales are kept in it), `dequantize()`,
`linear(x, bias)` (kernel choice in `kernels.py`), `embedding(tokens)` (for a quantized tied
embedding), `.to(device)`, `.astype(dtype)`, and the save protocol of `pangu_fn.io.leaves`.

Machine-specific copies (the CPU int4 pack, oneDNN's blocked bf16 weight, the NPU int4 pack)
are built once, when the leaf is made or first used (not while tracing), and never saved. Where
the native kernels run (`native.py`), none is needed on the CPU: they read the stored layout.
"""

from __future__ import annotations

import sys
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
    to_matmul_nbits,
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


def _reference_counts(holder: Any, attr: str) -> tuple[int, int, bool]:
    """(Python references to `holder.attr`, uses of its storage, not a view)."""
    t = getattr(holder, attr)
    return sys.getrefcount(t), torch._C._storage_Use_Count(t.untyped_storage()._cdata), t._base is None


class _Holder:
    def __init__(self) -> None:
        self.t = torch.zeros(1)


# what the counts are, on this interpreter, for a tensor that one attribute alone holds
_SOLE = _reference_counts(_Holder(), "t") if hasattr(torch._C, "_storage_Use_Count") else None


def _only_reference(holder: Any, attr: str) -> bool:
    """True when nothing but `holder.attr` references that tensor: no other name, container
    or view holds it or its storage, so its memory may be reused in place."""
    return _SOLE is not None and _reference_counts(holder, attr) == _SOLE


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ShapeError(message)


class _Leaf:
    """Behaviour shared by the leaf kinds."""

    shape: torch.Size
    compute_dtype: torch.dtype

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
        missing = [k for k in required if k not in tensors]
        extra = [k for k in tensors if k not in required + optional]
        if missing or extra:
            raise FormatError(f"{cls.kind} leaf: expected tensors {list(required + optional)}, "
                              f"found {sorted(tensors)} (description {description})")
        return tensors


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
        self._npu: tuple | None = None

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
        if self._npu is None:
            self._npu = kernels.npu_int8_data(self, dtype)
        return self._npu

    def _held(self) -> list[Any]:
        return [self.qdata, self.scales, self._npu]

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
        return cls(t["qdata"], t["scales"])


@register_leaf
class Int4Weight(_Leaf):
    """Group-wise 4-bit, ONNX MatMulNBits layout: `qdata` uint8 `[N, K/G, G/2]` (two codes per
    byte along K, low nibble first), `scales [N, K/G]` (compute dtype), `zero_points` uint8
    `[N, K/G]` (values 0..15) or None for symmetric (zero point 8); weight = (code - zero) * scale.

    On the CPU with bf16 compute the native int4 kernel reads `qdata` as it is. Where it cannot
    run, the leaf holds torch's CPU kernel's packed copy instead of `qdata` (rebuilt on demand,
    e.g. for saving) when that layout is invertible here, unless `keep_qdata`; a tied
    embedding's token lookup then unpacks only the row blocks it needs."""

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
        self._qdata: torch.Tensor | None = qdata.contiguous()
        self._cpu: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cpu_tried = False
        self._native: tuple | None | bool = False  # False: not looked at yet
        self._cuda: tuple | None | bool = False
        self._npu: tuple | None = None

    def _prepare_cpu(self) -> None:
        """Build the CPU kernel's packed weight and `scales_and_zeros [K/G, N, 2]` (value =
        (code - 8) * scale + zero, so zero = (8 - zero point) * scale), once, on first use.

        Rows are packed in chunks (whole row blocks of the packer), so the staging copies stay
        small. When nothing but this leaf references `qdata` (after `load` or `quantize`
        returned) and the layout is invertible, the pack is written over `qdata`'s own memory:
        no second buffer, and no freed buffer left to the allocator."""
        self._cpu_tried = True
        if (self._qdata.device.type != "cpu" or self.compute_dtype != torch.bfloat16
                or self.group_size not in (32, 64, 128, 256) or kernels.tracing()
                or self.native_kernel_data is not None):  # the native kernel reads qdata itself
            return
        n, k = self.shape
        pad = -n % CPU_ROW_MULTIPLE
        sz = kernels.scales_and_zeros(self.scales, self.zero_points, pad)
        invertible = not self.keep_qdata and cpu_layout_known()
        in_place = invertible and not pad and _only_reference(self, "_qdata")
        packed = self._qdata.view(n, k // 2) if in_place else torch.empty(n + pad, k // 2, dtype=torch.uint8)
        for r0 in range(0, n, PACK_ROWS):
            r1 = min(r0 + PACK_ROWS, n)
            codes = from_matmul_nbits(self._qdata[r0:r1])
            if r1 == n and pad:
                codes = torch.cat([codes, codes.new_full((pad, k), 8)])
            chunk = cpu_pack(codes)
            if invertible and r0 == 0 and not torch.equal(cpu_unpack(chunk, len(codes), k), codes):
                raise RuntimeError("int4 CPU pack: the packer's layout differs from the one probed")
            packed[r0:r0 + len(codes)] = chunk
        self._cpu = (packed, sz)
        if invertible:
            self._qdata = None  # one copy in memory; `qdata` rebuilds the canonical layout

    @property
    def native_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(qdata, scales, zero_points) for `native.int4_linear`, or None where it cannot run
        (another device or compute dtype, a (K, G) it does not take, or no native kernels)."""
        if self._native is False:
            fits = (self._qdata is not None and self._qdata.device.type == "cpu" and self.compute_dtype == torch.bfloat16
                    and native.int4_fits(self.shape[1], self.group_size))
            self._native = (self._qdata, self.scales, self.zero_points) if fits else None
        return self._native

    @property
    def cpu_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed weight, scales_and_zeros) for `_weight_int4pack_mm_for_cpu`, or None
        where that kernel does not apply (built on first use)."""
        if not self._cpu_tried:
            self._prepare_cpu()
        return self._cpu

    @property
    def cuda_kernel_data(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed weight, scales_and_zeros) for torch's CUDA int4 kernel, or None where it does
        not apply (built on first use; the leaf then holds both copies)."""
        if self._cuda is False:
            self._cuda = kernels.cuda_int4_data(self) if self.scales.device.type == "cuda" else None
        return self._cuda

    def codes(self, rows: slice = slice(None)) -> torch.Tensor:
        """Codes `[N, K]` uint8 (0..15), or those of `rows` (a step-1 slice whose start is a
        multiple of 64, the CPU packer's row block, when only the CPU pack is held)."""
        if self._qdata is not None:
            return from_matmul_nbits(self._qdata[rows])
        n, k = self.shape
        r0, r1, _ = rows.indices(n)
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
            block, n = cpu_row_block(), self.shape[0]
            starts = (flat // block * block).tolist()
            blocks = {s: self.codes(slice(s, min(s + block, n))) for s in set(starts)}
            codes = torch.stack([blocks[s][t - s] for t, s in zip(flat.tolist(), starts)])
        zeros = None if self.zero_points is None else self.zero_points[flat]
        rows = int4_dequantize(codes, self.scales[flat], zeros, self.compute_dtype)
        return rows.view(*tokens.shape, self.shape[1])

    def npu_kernel_data(self, dtype: torch.dtype) -> tuple:
        if self._npu is None:
            self._npu = kernels.npu_int4_data(self, dtype)
        return self._npu

    def _held(self) -> list[Any]:
        return [self._qdata, self.scales, self.zero_points, self._cpu, self._cuda or None, self._npu]

    def to(self, device: str | torch.device) -> Int4Weight:
        zp = None if self.zero_points is None else self.zero_points.to(device)
        return Int4Weight(self.qdata.to(device), self.scales.to(device), zp, self.group_size, self.keep_qdata)

    def astype(self, dtype: torch.dtype) -> Int4Weight:
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
        if not isinstance(group, int) or group < 2:
            raise FormatError(f"int4 leaf: expected an integer group_size in its description, found {description}")
        return cls(t["qdata"], t["scales"], t.get("zero_points"), group, bool(description.get("keep_qdata", False)))


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
        return cls(t["weight"], bool(description.get("keep_dense", False)))


def is_quantized(leaf: Any) -> bool:
    """True for any leaf this package makes (int8, int4, dense-packed)."""
    return isinstance(leaf, _Leaf)
