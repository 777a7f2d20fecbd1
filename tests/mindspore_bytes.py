"""A MindSpore `.ckpt` encoder and decoder written by hand from checkpoint.proto, for tests,
independent of `pangu_fn.io.mindspore` (varints and length-delimited fields only).

    Checkpoint { repeated Value value = 1; }
    Value { string tag = 1; TensorProto tensor = 2; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
"""

from __future__ import annotations

import binascii

import numpy as np
import torch

TYPE_OF = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16",
           torch.int32: "Int32", torch.int64: "Int64", torch.uint8: "UInt8", torch.int8: "Int8",
           torch.bool: "Bool", torch.float64: "Float64", torch.int16: "Int16"}


def varint(n: int) -> bytes:
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        out += bytes([low | (0x80 if n else 0)])
        if not n:
            return out


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def value(name: str, dims: list[int], type_name: str, content: bytes, packed: bool = False,
          extra_tensor_fields: bytes = b"") -> bytes:
    """One top-level `0x0A len Value` record."""
    if packed:
        dims_bytes = field(1, b"".join(varint(d) for d in dims))
    else:
        dims_bytes = b"".join(varint(1 << 3 | 0) + varint(d) for d in dims)
    tensor = dims_bytes + field(2, type_name.encode()) + extra_tensor_fields + field(3, content)
    return field(1, field(1, name.encode()) + field(2, tensor))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian C-order bytes (as numpy.tobytes() on a little-endian host)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def tensor_value(name: str, t: torch.Tensor, pieces: int = 1) -> bytes:
    """The Value(s) of a tensor; `pieces` > 1 splits its content as MindSpore does for big ones."""
    data = tensor_bytes(t)
    if pieces == 1:
        return value(name, list(t.shape), TYPE_OF[t.dtype], data)
    step = -(-len(data) // pieces)
    return b"".join(value(name, list(t.shape), TYPE_OF[t.dtype], data[i:i + step])
                    for i in range(0, len(data), step))


def with_crc(data: bytes) -> bytes:
    return data + b"crc_num" + binascii.crc32(data).to_bytes(10, "big")


def decode(data: bytes) -> list[tuple[str, list[int], str, bytes]]:
    """Every Value as (tag, dims, tensor_type, content), in file order, trailer stripped."""
    if data[-17:-10] == b"crc_num":
        assert binascii.crc32(data[:-17]) == int.from_bytes(data[-10:], "big")
        data = data[:-17]
    out = []

    def read_varint(buf: bytes, i: int) -> tuple[int, int]:
        n = shift = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n, i

    def fields(buf: bytes):
        i = 0
        while i < len(buf):
            key, i = read_varint(buf, i)
            if key & 7 == 0:
                v, i = read_varint(buf, i)
                yield key >> 3, v
            else:
                n, i = read_varint(buf, i)
                yield key >> 3, buf[i:i + n]
                i += n

    for number, val in fields(data):
        assert number == 1
        tag, dims, ttype, content = None, [], None, None
        for n2, v2 in fields(val):
            if n2 == 1:
                tag = v2.decode()
            elif n2 == 2:
                for n3, v3 in fields(v2):
                    if n3 == 1:
                        dims.append(v3)
                    elif n3 == 2:
                        ttype = v3.decode()
                    elif n3 == 3:
                        content = v3
        out.append((tag, dims, ttype, content))
    return out


def array_of(dims: list[int], type_name: str, content: bytes) -> np.ndarray:
    np_type = {"Float32": "<f4", "Float16": "<f2", "Int32": "<i4", "Int64": "<i8", "UInt8": "u1",
               "Int8": "i1", "Bool": "?", "Float64": "<f8", "Int16": "<i2", "BFloat16": "<i2"}[type_name]
    return np.frombuffer(content, dtype=np_type).reshape(dims)
