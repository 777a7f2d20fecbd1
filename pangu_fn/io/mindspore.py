"""MindSpore `.ckpt` files without MindSpore: a streaming reader and writer of the wire format.

The schema (`mindspore/ccsrc/utils/checkpoint.proto`, proto2):

    message Checkpoint { repeated Value value = 1; }
    message Value { required string tag = 1; TensorProto tensor = 2; MapTensorProto maptensor = 3; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2;
                          required bytes tensor_content = 3; }

A file is a run of single-Value `Checkpoint` messages (`0x0A len Value`), optionally followed by
a 17-byte CRC trailer `b"crc_num"` + the 10-byte big-endian CRC-32 of everything before it.
`tensor_content` is the little-endian C-order bytes of the array; a tensor above 512 MiB is
split into consecutive Values with the same tag and the full dims (their contents concatenate).

`CheckpointReader` scans the file once, recording where each tensor's bytes lie (it never holds
more than one field header in memory), and `read(name)` reads one tensor straight into a fresh
tensor: peak memory is about the largest tensor. Files encrypted by MindSpore (`enc_key`) start
with a 4-byte magic number and are refused. `write_checkpoint` streams tensors out in the same
format (checked against this reader and a byte-level test; MindSpore itself was not installed).
"""

from __future__ import annotations

import binascii
import math
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ConfigError, FormatError
from .atomic import atomic_file
from .source import tensor_chunks

# MindSpore's str(dtype) -> torch dtype. MindSpore 1.x spells the unsigned types "Uint8" ...
DTYPES: dict[str, torch.dtype] = {
    "Float16": torch.float16, "Float32": torch.float32, "Float64": torch.float64,
    "BFloat16": torch.bfloat16, "Int8": torch.int8, "Int16": torch.int16, "Int32": torch.int32,
    "Int64": torch.int64, "UInt8": torch.uint8, "UInt16": torch.uint16, "UInt32": torch.uint32,
    "UInt64": torch.uint64, "Uint8": torch.uint8, "Uint16": torch.uint16, "Uint32": torch.uint32,
    "Uint64": torch.uint64, "Bool": torch.bool,
}
# types MindSpore writes that hold no plain numeric array we can read
NON_TENSOR_TYPES = ("str", "Int4", "Complex64", "Complex128")
TYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items() if not n.startswith("Uint")}

CRC_MAGIC = b"crc_num"
CRC_TRAILER = len(CRC_MAGIC) + 10
ENCRYPTION_MAGIC = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
SPLIT_BYTES = 512 * 1024**2  # MindSpore splits tensor contents above this size
MAX_STRING = 1 << 16  # longest tag or type name we accept
MAX_DIMS = 64

# optimizer state and training bookkeeping that a model checkpoint may carry
TRAINING_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moments.", "moment1.", "moment2.",
                     "global_step", "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
                     "epoch_num", "step_num", "learning_rate", "beta1_power", "beta2_power", "loss_scale")
TRAINING_SUFFIXES = (".key_past", ".value_past")


def is_training_entry(name: str) -> bool:
    """Optimizer moments, gradient accumulators, step counters, incremental-inference state."""
    return name.startswith(TRAINING_PREFIXES) or name.endswith(TRAINING_SUFFIXES)


@dataclass
class Entry:
    """One named value: its dims, type name and where its content bytes lie in the file."""

    name: str
    dims: tuple[int, ...]
    type_name: str
    offset: int  # file offset of the (first) Value holding it
    pieces: list[tuple[int, int]] = field(default_factory=list)  # (file offset, length) of contents
    kind: str = "tensor"  # "tensor" | "maptensor"

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.pieces)

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.type_name)

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor" and self.dtype is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """dims, except that MindSpore's scalars (dims `[]`, or `[0]` with one element) are `()`."""
        if self.dims == (0,) and self.dtype is not None and self.nbytes == _itemsize(self.dtype):
            return ()
        return self.dims

    def expected_nbytes(self) -> int | None:
        if self.dtype is None:
            return None
        return math.prod(self.shape) * _itemsize(self.dtype)


class CheckpointReader:
    """Index of a MindSpore `.ckpt` file; tensors are read one at a time with `read(name)`, or
    in part with `read_part(name, dim, start, stop)` (tensor parallelism reads a rank's slices).

    Opening scans the whole file (seeking over tensor contents) and, when a CRC trailer is
    present and `verify_crc`, checks it. Raises FormatError naming the file, the tensor and the
    byte offset for anything malformed: truncation, unknown wire types, unknown tensor types,
    dims that disagree with the byte count, names that repeat, encrypted files."""

    def __init__(self, path: str | Path, verify_crc: bool = True) -> None:
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115  (closed by close() / __exit__)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open: {e.strerror or e}") from None
        self.crc: int | None = None
        self.bytes_read = 0  # tensor content read so far (read, read_part)
        self.end = self._find_end(verify_crc)
        self.entries: dict[str, Entry] = {}
        self._scan()

    # -- public --------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` (a fresh CPU tensor of its stored dtype and shape)."""
        e = self.entries.get(name)
        if e is None:
            raise FormatError(f"{self.path}: no tensor {name!r}")
        if not e.is_tensor:
            raise FormatError(f"{self.path}: tensor {name!r} (offset {e.offset}) has type {e.type_name!r}"
                              f"{' (a map tensor)' if e.kind == 'maptensor' else ''}; expected one of "
                              f"{sorted(TYPE_NAMES.values())}")
        out = torch.empty(e.shape, dtype=e.dtype)
        if out.numel() == 0:
            return out
        self._copy(e, 0, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out

    def read_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (`dim` 0) or columns (`dim` 1, of a 2-D tensor) `start:stop` of tensor `name`,
        reading only their bytes: one range for rows, one per row for columns. Raises
        FormatError as `read` does, and for a slice outside the tensor."""
        e = self.entries.get(name)
        if e is None or not e.is_tensor:
            return self.read(name)  # raises the same errors
        shape = e.shape
        if not (0 <= dim < len(shape) <= 2 and 0 <= start <= stop <= shape[dim]):
            raise FormatError(f"{self.path}: tensor {name!r} of shape {list(shape)}: no slice {start}:{stop} "
                              f"along dim {dim}")
        item = _itemsize(e.dtype)
        cols = shape[1] if len(shape) == 2 else 1
        if dim == 0:
            out = torch.empty((stop - start, *shape[1:]), dtype=e.dtype)
            if out.numel():
                self._copy(e, start * cols * item, memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            return out
        out = torch.empty((shape[0], stop - start), dtype=e.dtype)
        if out.numel():
            flat, width = memoryview(out.reshape(-1).view(torch.uint8).numpy()), (stop - start) * item
            for r in range(shape[0]):
                self._copy(e, (r * cols + start) * item, flat[r * width:(r + 1) * width])
        return out

    def _copy(self, e: Entry, offset: int, buf: memoryview) -> None:
        """Fill `buf` with the bytes of `e`'s content from byte `offset` on (across its pieces)."""
        pos, need = 0, len(buf)
        for start, n in e.pieces:
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, need - pos)
            self._f.seek(start + offset)
            got = self._f.readinto(buf[pos:pos + take])
            if got != take:
                raise FormatError(f"{self.path}: tensor {e.name!r}: expected {take} bytes at offset "
                                  f"{start + offset}, read {got} (the file changed or is truncated)")
            self.bytes_read += got
            pos, offset = pos + take, 0
            if pos == need:
                return
        raise FormatError(f"{self.path}: tensor {e.name!r}: its content ends {need - pos} bytes early")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CheckpointReader:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- scanning -----------------------------------------------------------------------
    def _find_end(self, verify_crc: bool) -> int:
        """Where the protobuf data ends (before a CRC trailer); checks the magic numbers."""
        head = self._f.read(4)
        if not head:
            raise FormatError(f"{self.path}: empty file; expected a MindSpore checkpoint")
        if len(head) == 4 and struct.unpack("<I", head)[0] in ENCRYPTION_MAGIC:
            mode = ENCRYPTION_MAGIC[struct.unpack("<I", head)[0]]
            raise FormatError(f"{self.path}: encrypted MindSpore checkpoint ({mode} magic number at offset 0); "
                              "pangu-fn cannot decrypt it: load it in MindSpore with dec_key=... and "
                              "save_checkpoint it again without enc_key")
        if head[0] != 0x0A:
            raise FormatError(f"{self.path}: not a MindSpore checkpoint: byte 0x{head[0]:02X} at offset 0, "
                              "expected 0x0A (field 1, a Value)")
        end = self.size
        if self.size >= CRC_TRAILER:
            self._f.seek(self.size - CRC_TRAILER)
            tail = self._f.read(CRC_TRAILER)
            if tail[:len(CRC_MAGIC)] == CRC_MAGIC:
                end = self.size - CRC_TRAILER
                self.crc = int.from_bytes(tail[len(CRC_MAGIC):], "big")
                if verify_crc:
                    self._verify_crc(end)
        return end

    def _verify_crc(self, end: int) -> None:
        self._f.seek(0)
        crc, left = 0, end
        while left:
            chunk = self._f.read(min(left, 4 * 1024**2))
            if not chunk:
                break
            crc = binascii.crc32(chunk, crc)
            left -= len(chunk)
        if crc != self.crc:
            raise FormatError(f"{self.path}: CRC-32 mismatch: the trailer at offset {end} says {self.crc:#010x}, "
                              f"the {end} bytes before it give {crc:#010x}; the file is corrupted")

    def _scan(self) -> None:
        cur = _Cursor(self._f, self.path, self.end)
        cur.seek(0)
        last: Entry | None = None
        while cur.pos < self.end:
            start = cur.pos
            key = cur.varint("field key")
            number, wire = key >> 3, key & 7
            if number != 1 or wire != 2:
                if wire not in (0, 1, 2, 5):
                    raise FormatError(f"{self.path}: offset {start}: wire type {wire} (field {number}) "
                                      "is not valid here; expected a Value (0x0A)")
                cur.skip_field(wire, number)
                continue
            length = cur.varint("Value length")
            value_end = cur.pos + length
            value = self._value(cur, start, value_end)
            if length and value_end > self.end:
                cur.truncated(value_end, value.name or None, "Value")
            last = self._add(value, last)
        for e in self.entries.values():
            want = e.expected_nbytes()
            if want is not None and e.kind == "tensor" and want != e.nbytes:
                raise FormatError(f"{self.path}: tensor {e.name!r} (offset {e.offset}): dims {list(e.dims)} of "
                                  f"{e.type_name} need {want} bytes, found {e.nbytes}")

    def _value(self, cur: _Cursor, start: int, end: int) -> Entry:
        entry = Entry(name="", dims=(), type_name="", offset=start)
        have_tensor = False
        while cur.pos < end:
            key = cur.varint("Value field key", entry.name, end)
            number, wire = key >> 3, key & 7
            if number == 1 and wire == 2:
                entry.name = cur.string("tag", entry.name, end)
            elif number == 2 and wire == 2:
                if have_tensor:
                    raise FormatError(f"{self.path}: offset {cur.pos}: tensor {entry.name!r} has two tensor fields")
                have_tensor = True
                n = cur.varint("tensor length", entry.name, end)
                self._tensor(cur, entry, cur.pos + n, end)  # n is read before cur.pos is
            elif number == 3 and wire == 2:
                entry.kind = "maptensor"
                cur.skip(cur.varint("maptensor length", entry.name, end), entry.name, end)
            else:
                cur.skip_field(wire, number, entry.name, end)
        if cur.pos != end:
            cur.overrun(end, entry.name)
        if not entry.name:
            raise FormatError(f"{self.path}: offset {start}: a Value without its required tag (name)")
        if entry.kind == "tensor" and not have_tensor:
            raise FormatError(f"{self.path}: offset {start}: tensor {entry.name!r} has no tensor field")
        return entry

    def _tensor(self, cur: _Cursor, entry: Entry, end: int, outer: int) -> None:
        if end > outer:
            cur.overrun(outer, entry.name, "TensorProto")
        dims: list[int] = []
        have_type = have_content = False
        while cur.pos < end:
            key = cur.varint("TensorProto field key", entry.name, end)
            number, wire = key >> 3, key & 7
            if number == 1 and wire == 0:
                dims.append(cur.varint("dim", entry.name, end))
            elif number == 1 and wire == 2:  # packed dims
                n = cur.varint("packed dims length", entry.name, end)
                stop = cur.pos + n
                if stop > end:
                    cur.overrun(end, entry.name, "packed dims")
                while cur.pos < stop:
                    dims.append(cur.varint("dim", entry.name, stop))
            elif number == 2 and wire == 2:
                entry.type_name = cur.string("tensor_type", entry.name, end)
                have_type = True
            elif number == 3 and wire == 2:
                if have_content:
                    raise FormatError(f"{self.path}: offset {cur.pos}: tensor {entry.name!r} has two tensor_content fields")
                n = cur.varint("tensor_content length", entry.name, end)
                entry.pieces.append((cur.pos, n))
                cur.skip(n, entry.name, end)
                have_content = True
            else:
                cur.skip_field(wire, number, entry.name, end)
            if len(dims) > MAX_DIMS:
                raise FormatError(f"{self.path}: offset {cur.pos}: tensor {entry.name!r} has more than {MAX_DIMS} dims")
        if cur.pos != end:
            cur.overrun(end, entry.name, "TensorProto")
        for d in dims:
            if d >= 1 << 62:  # a negative int64 or an absurd size
                raise FormatError(f"{self.path}: offset {entry.offset}: tensor {entry.name!r} has dim {d}; "
                                  "expected a non-negative size")
        if not have_type or not have_content:
            missing = "tensor_type" if not have_type else "tensor_content"
            raise FormatError(f"{self.path}: offset {entry.offset}: tensor {entry.name!r} lacks its required {missing}")
        if entry.type_name not in DTYPES and entry.type_name not in NON_TENSOR_TYPES:
            raise FormatError(f"{self.path}: offset {entry.offset}: tensor {entry.name!r} has tensor_type "
                              f"{entry.type_name!r}; expected one of {sorted(DTYPES) + list(NON_TENSOR_TYPES)}")
        entry.dims = tuple(dims)

    def _add(self, value: Entry, last: Entry | None) -> Entry:
        """Record a Value; a Value continuing the previous one's tag is the next piece of a
        split tensor, any other repeated tag is an error."""
        old = self.entries.get(value.name)
        if old is None:
            self.entries[value.name] = value
            return value
        want = old.expected_nbytes()
        continues = (old is last and old.kind == value.kind == "tensor" and old.dims == value.dims
                     and old.type_name == value.type_name and want is not None and old.nbytes < want)
        if not continues:
            raise FormatError(f"{self.path}: tensor {value.name!r} appears twice (offsets {old.offset} and "
                              f"{value.offset}); expected unique names")
        old.pieces.extend(value.pieces)
        return old


class _Cursor:
    """Reads protobuf primitives from a file at `pos`, never past `limit` (the data end)."""

    def __init__(self, f: BinaryIO, path: Path, limit: int) -> None:
        self.f, self.path, self.limit, self.pos = f, path, limit, 0

    def seek(self, pos: int) -> None:
        self.pos = pos
        self.f.seek(pos)

    def where(self, name: str | None) -> str:
        return f"{self.path}: offset {self.pos}" + (f" (tensor {name!r})" if name else "")

    def truncated(self, need: int, name: str | None, what: str) -> None:
        raise FormatError(f"{self.path}: truncated: {what}{f' of tensor {name!r}' if name else ''} at offset "
                          f"{self.pos} runs to offset {need}, but the data ends at {self.limit}")

    def overrun(self, end: int, name: str | None, what: str = "Value") -> None:
        raise FormatError(f"{self.where(name)}: a field runs past the end of its {what} (offset {end})")

    def varint(self, what: str, name: str | None = None, end: int | None = None) -> int:
        stop = min(self.limit, end if end is not None else self.limit)
        result = shift = 0
        start = self.pos
        while True:
            if self.pos >= stop:
                if stop == self.limit:
                    raise FormatError(f"{self.path}: truncated: {what}{f' of tensor {name!r}' if name else ''} "
                                      f"at offset {start} is cut off by the end of the data (offset {self.limit})")
                self.overrun(stop, name)
            b = self.f.read(1)[0]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift >= 70:
                raise FormatError(f"{self.path}: offset {start}: {what}{f' of tensor {name!r}' if name else ''} "
                                  "is a varint longer than 10 bytes")

    def _check(self, n: int, what: str, name: str | None, end: int | None) -> None:
        if self.pos + n > self.limit:
            self.truncated(self.pos + n, name, what)
        if end is not None and self.pos + n > end:
            self.overrun(end, name)

    def string(self, what: str, name: str | None, end: int) -> str:
        n = self.varint(f"{what} length", name, end)
        if n > MAX_STRING:
            raise FormatError(f"{self.where(name)}: {what} is {n} bytes long; expected at most {MAX_STRING}")
        self._check(n, what, name, end)
        raw = self.f.read(n)
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: offset {self.pos - n}: {what} is not UTF-8: {raw[:40]!r}") from None

    def skip(self, n: int, name: str | None = None, end: int | None = None) -> None:
        self._check(n, "field", name, end)
        self.pos += n
        self.f.seek(self.pos)

    def skip_field(self, wire: int, number: int, name: str | None = None, end: int | None = None) -> None:
        """Skip an unknown field (proto2 readers ignore them); groups are refused."""
        if wire == 0:
            self.varint(f"field {number}", name, end)
        elif wire == 1:
            self.skip(8, name, end)
        elif wire == 5:
            self.skip(4, name, end)
        elif wire == 2:
            self.skip(self.varint(f"field {number} length", name, end), name, end)
        else:
            raise FormatError(f"{self.where(name)}: field {number} has wire type {wire}; expected 0, 1, 2 or 5")


# -- writing ---------------------------------------------------------------------------------

def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_checkpoint(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], crc: bool = True,
                     split_bytes: int = SPLIT_BYTES, dtype: torch.dtype | None = None,
                     on_tensor: Callable[[str, int], None] | None = None) -> Path:
    """Write `(name, tensor)` pairs as a MindSpore `.ckpt` file, atomically (a temporary file
    renamed into place). Tensors are streamed in chunks, so a non-contiguous view (a
    transpose) costs no copy of the whole tensor; floating tensors are cast to `dtype` if
    given. Contents above `split_bytes` go into several Values with the same tag, as MindSpore
    does. With `crc`, the CRC trailer MindSpore's `crc_check=True` writes is appended.
    `on_tensor(name, nbytes)` is called after each tensor (progress)."""
    if split_bytes <= 0:
        raise ConfigError(f"write_checkpoint {path}: split_bytes: expected a positive byte count, found {split_bytes}")
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        out = _CrcWriter(f)
        for name, t in tensors:
            if not isinstance(t, torch.Tensor):
                raise FormatError(f"write_checkpoint {path}: tensor {name!r}: expected a torch.Tensor, found a "
                                  f"{type(t).__name__}; dequantize before writing MindSpore checkpoints")
            cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
            if cast not in TYPE_NAMES:
                raise FormatError(f"write_checkpoint {path}: tensor {name!r}: expected a dtype MindSpore checkpoints "
                                  f"hold ({sorted(map(str, TYPE_NAMES))}), found {cast}")
            nbytes = t.numel() * _itemsize(cast)
            header = _field(1, name.encode())
            dims = b"".join(_varint(1 << 3) + _varint(d) for d in t.shape)
            type_field = _field(2, TYPE_NAMES[cast].encode())
            chunks = tensor_chunks(t, cast)
            sizes = [min(split_bytes, nbytes - s) for s in range(0, nbytes, split_bytes)] or [0]
            for size in sizes:
                tensor_msg_len = len(dims) + len(type_field) + 1 + len(_varint(size)) + size
                value_len = len(header) + 1 + len(_varint(tensor_msg_len)) + tensor_msg_len
                out.write(_varint(1 << 3 | 2) + _varint(value_len) + header
                          + _varint(2 << 3 | 2) + _varint(tensor_msg_len) + dims + type_field
                          + _varint(3 << 3 | 2) + _varint(size))
                out.copy_from(chunks, size)
            if on_tensor is not None:
                on_tensor(name, nbytes)
        if crc:
            f.write(CRC_MAGIC + out.crc.to_bytes(10, "big"))
    return Path(path)


class _CrcWriter:
    """A file writer that keeps the running CRC-32 of what it wrote."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.crc = f, 0
        self._pending = memoryview(b"")

    def write(self, data: bytes | memoryview) -> None:
        self.crc = binascii.crc32(data, self.crc)
        self.f.write(data)

    def copy_from(self, chunks: Iterator[memoryview], n: int) -> None:
        """Write exactly `n` bytes taken from the chunk stream (chunks may straddle calls)."""
        while n:
            if not len(self._pending):
                self._pending = next(chunks)
            take = self._pending[:n]
            self.write(take)
            self._pending = self._pending[len(take):]
            n -= len(take)
