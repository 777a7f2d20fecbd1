"""safetensors files: a strict header check of our own, then the `safetensors` library's
`safe_open` for the tensor bytes; and a streaming writer.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then
the byte buffer (offsets relative to its start; it must be covered exactly, without holes or
overlaps). `read_header` checks all of that before the library sees the file, because the
library accepts duplicate names and shapes whose strides overflow (`[0, 2**62, 2**62]`) and
reports the rest without naming the tensor; it raises FormatError naming the file, the tensor,
the field, what was expected and the byte offset. `SafetensorsFile.get` / `read_slice` then
read through `safe_open` (memory-mapped, lazy), opening the file per read so that a tensor
dropped by the caller releases its pages: converting costs about one tensor of memory.
`write_safetensors` streams tensors out in chunks after writing a header computed from their
shapes (the library's `save_file` needs every tensor of a shard in memory at once; see
docs/convert.md for the measurement).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FormatError, InputError
from .source import tensor_chunks

MAX_HEADER = 100_000_000
MAX_STRIDE_BYTES = 2**63 - 1  # strides and byte offsets are int64 in torch
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn, "C64": torch.complex64,
}
NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the tensor's bytes
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """({name: TensorInfo}, metadata) of a safetensors file, after checking every rule of the
    format against the file size: the header length against the file size and MAX_HEADER
    before reading it, UTF-8 JSON without duplicate names, known dtypes, non-negative integer
    dims whose strides fit in 64 bits, byte sizes equal to the offsets' span, offsets inside
    the buffer that cover it exactly. Raises FormatError naming file, tensor and offset."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{path}: {size} bytes; a safetensors file starts with an 8-byte header length")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_HEADER:
                raise FormatError(f"{path}: header length {n} at offset 0 exceeds the limit of {MAX_HEADER} bytes")
            if 8 + n > size:
                raise FormatError(f"{path}: header length {n} at offset 0 runs past the end of the file "
                                  f"({size} bytes); the file is truncated or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header (offset 8) is not UTF-8 at byte {8 + e.start}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: header (offset 8) is not valid JSON at byte {8 + e.pos}: {e.msg}") from None
    except RecursionError:
        raise FormatError(f"{path}: header (offset 8) nests JSON too deeply; expected a flat object") from None
    except _Duplicate as e:
        raise FormatError(f"{path}: header (offset 8) names {str(e.args[0])[:80]!r} twice; expected unique "
                          "names") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise FormatError(f"{path}: header (offset 8) is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header (offset 8) is a JSON {type(header).__name__}; expected an object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{path}: __metadata__ must map strings to strings, found {str(meta)[:80]}")
    data_start, data_len = 8 + n, size - 8 - n
    infos = {name: _entry(path, name, d, data_start, data_len) for name, d in header.items()}
    covered = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin - data_start != covered:
            what = "overlaps the previous tensor" if info.begin - data_start < covered else "leaves a hole before it"
            raise FormatError(f"{path}: tensor {name!r} at offset {info.begin} {what}; expected it at "
                              f"offset {data_start + covered}")
        covered = info.end - data_start
    if covered != data_len:
        raise FormatError(f"{path}: tensors cover {covered} bytes of the {data_len}-byte buffer at offset "
                          f"{data_start}; the file is truncated or has trailing bytes")
    return infos, meta


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _entry(path: Path, name: str, d: Any, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name[:120]!r}"
    if not isinstance(d, dict):
        raise FormatError(f"{where}: header entry is {type(d).__name__}; expected an object")
    dtype, shape, offsets = d.get("dtype"), d.get("shape"), d.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{where}: dtype {repr(dtype)[:80]}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise FormatError(f"{where}: shape {str(shape)[:80]}; expected a list of non-negative integers")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if math.prod(max(s, 1) for s in shape) * itemsize > MAX_STRIDE_BYTES:
        raise FormatError(f"{where}: shape {str(shape)[:200]} of {dtype} overflows 64-bit byte strides; expected "
                          "dimensions whose product fits in 2**63 bytes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise FormatError(f"{where}: data_offsets {str(offsets)[:80]}; expected [begin, end] integers with "
                          "0 <= begin <= end")
    if offsets[1] > data_len:
        raise FormatError(f"{where}: data_offsets {offsets} run past the end of the {data_len}-byte buffer "
                          f"at offset {data_start}")
    need = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != need:
        raise FormatError(f"{where}: shape {shape} of {dtype} needs {need} bytes, data_offsets "
                          f"{offsets} hold {offsets[1] - offsets[0]} (at offset {data_start + offsets[0]})")
    return TensorInfo(DTYPES[dtype], tuple(shape), data_start + offsets[0], data_start + offsets[1])


class SafetensorsFile:
    """One safetensors file: validated header (`infos`, `metadata`), tensors read on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.infos, self.metadata = read_header(self.path)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (memory-mapped, copy-on-write). Raises FormatError for an unknown
        name or a file that changed since its header was checked."""
        return self._read(name, lambda f: f.get_tensor(name))

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of tensor `name` along `dim` (only those bytes are read). Raises
        InputError for a dim or range outside the tensor's shape."""
        info = self._info(name)
        if not -len(info.shape) <= dim < len(info.shape):
            raise InputError(f"{self.path}: tensor {name!r} of shape {list(info.shape)}: dim {dim} is out of range")
        dim %= len(info.shape)
        if not 0 <= start <= stop <= info.shape[dim]:
            raise InputError(f"{self.path}: tensor {name!r} of shape {list(info.shape)}: expected "
                             f"0 <= start <= stop <= {info.shape[dim]} along dim {dim}, found {start}:{stop}")
        index = (slice(None),) * dim + (slice(start, stop),)
        return self._read(name, lambda f: f.get_slice(name)[index])

    def _info(self, name: str) -> TensorInfo:
        if name not in self.infos:
            raise FormatError(f"{self.path}: no tensor {name!r}; it holds {sorted(self.infos)[:8]}")
        return self.infos[name]

    def _read(self, name: str, read: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        info = self._info(name)
        try:
            with safe_open(self.path, framework="pt") as f:  # opened per read: see the module docstring
                t = read(f)
        except (SafetensorError, OSError) as e:
            raise FormatError(f"{self.path}: tensor {name!r}: expected {info.end - info.begin} bytes at offset "
                              f"{info.begin}, the file no longer holds them ({e}); it changed after its header "
                              "was checked") from None
        if t.dtype != info.dtype:
            raise FormatError(f"{self.path}: tensor {name!r}: read {t.dtype}, the header says {info.dtype}")
        return t


def read_slice(path: str | Path, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Elements `start:stop` along `dim` of the tensor `name` in the safetensors file `path`,
    reading only those bytes (for tensor parallelism: each rank reads its rows or columns).
    The header is checked as by `read_header`. Raises FormatError for a bad file or unknown
    name, InputError for a dim or range outside the tensor's shape."""
    return SafetensorsFile(path).get_slice(name, dim, start, stop)


def write_safetensors(path: Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                      get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None) -> None:
    """Write the tensors named in `plan` (name, dtype to store, shape) to `path`, fetching
    each with `get(name)` only when its turn comes and writing it in chunks (floating tensors
    are cast to the planned dtype on the way). Entries are laid out by descending element
    size, then name, so every tensor is aligned. Raises FormatError when a fetched tensor's
    shape disagrees with the plan."""
    order = sorted(plan, key=lambda e: (-torch.empty((), dtype=e[1]).element_size(), e[0]))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape in order:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in order:
            t = get(name)
            if tuple(t.shape) != tuple(shape):
                raise FormatError(f"{path.name}: tensor {name} has shape {list(t.shape)}, planned {list(shape)}")
            f.writelines(tensor_chunks(t, dtype))
            if on_tensor is not None:
                on_tensor(name, math.prod(shape) * torch.empty((), dtype=dtype).element_size())


def write_sharded(folder: Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                  get: Callable[[str], torch.Tensor], shard_size: int,
                  metadata: dict[str, str] | None = None,
                  on_tensor: Callable[[str, int], None] | None = None) -> list[str]:
    """Write `plan` into `folder` as `model.safetensors`, or, past `shard_size` bytes, as
    `model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json` (the Hugging Face
    layout; a single tensor larger than a shard gets a shard of its own). Returns the file names."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for entry in plan:
        n = math.prod(entry[2]) * torch.empty((), dtype=entry[1]).element_size()
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], get, metadata, on_tensor)
        return ["model.safetensors"]
    names, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard, get, metadata, on_tensor)
        names.append(fname)
        for name, dtype, shape in shard:
            weight_map[name] = fname
            total += math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + ["model.safetensors.index.json"]
