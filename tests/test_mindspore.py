"""The MindSpore `.ckpt` reader against files built byte by byte from the proto schema (see
mindspore_bytes.py), the writer against an independent decoder, and bad or hostile files."""

from __future__ import annotations

import binascii
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mindspore_bytes import array_of, decode, field, tensor_bytes, tensor_value, value, varint, with_crc

from pangu_fn.errors import FormatError
from pangu_fn.io.mindspore import CheckpointReader, write_checkpoint


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(3, 5, generator=g),
        "w.f16": torch.randn(4, 2, generator=g).half(),
        "w.bf16": torch.randn(7, generator=g).bfloat16(),
        "i.i32": torch.randint(-50, 50, (2, 3, 4), generator=g, dtype=torch.int32),
        "i.i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "u.u8": torch.randint(0, 255, (6,), generator=g, dtype=torch.uint8),
        "b.bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }


def write(tmp_path, data: bytes, name: str = "m.ckpt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def read_all(path) -> dict[str, torch.Tensor]:
    with CheckpointReader(path) as r:
        return {n: r.read(n) for n, e in r.entries.items() if e.is_tensor}


def test_reads_hand_built_file(tmp_path):
    ts = tensors()
    data = b"".join(tensor_value(n, t) for n, t in ts.items())
    # scalars as MindSpore writes them: old saves dims [0], newer ones []; packed dims; an
    # unknown field (number 9, varint) inside a TensorProto; spelling "Uint8" of MindSpore 1.x
    data += value("step_old", [0], "Int32", struct.pack("<i", 7))
    data += value("step_new", [], "Float32", struct.pack("<f", 0.5))
    data += value("packed", [2, 2], "Float32", struct.pack("<4f", 1, 2, 3, 4), packed=True)
    data += value("extra", [2], "Int64", struct.pack("<2q", -1, 9), extra_tensor_fields=varint(9 << 3) + varint(300))
    data += value("old_u8", [3], "Uint8", bytes([1, 2, 255]))
    got = read_all(write(tmp_path, data))
    for n, t in ts.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n
    assert got["step_old"].shape == () and got["step_old"].item() == 7
    assert got["step_new"].shape == () and got["step_new"].item() == 0.5
    assert got["packed"].tolist() == [[1, 2], [3, 4]]
    assert got["extra"].tolist() == [-1, 9]
    assert got["old_u8"].dtype == torch.uint8 and got["old_u8"].tolist() == [1, 2, 255]


def test_split_tensor_is_joined_and_crc_is_checked(tmp_path):
    big = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    data = tensor_value("a", torch.ones(2)) + tensor_value("big", big, pieces=3) + tensor_value("z", torch.zeros(3))
    assert len(decode(data)) == 5  # really three Values for "big"
    got = read_all(write(tmp_path, with_crc(data)))
    assert torch.equal(got["big"], big) and got.keys() == {"a", "big", "z"}
    with CheckpointReader(tmp_path / "m.ckpt") as r:
        assert r.crc == binascii.crc32(data) and len(r.entries["big"].pieces) == 3

    corrupt = bytearray(with_crc(data))
    corrupt[len(data) // 2] ^= 0x01
    with pytest.raises(FormatError, match=r"m.ckpt: CRC-32 mismatch: the trailer at offset \d+"):
        CheckpointReader(write(tmp_path, bytes(corrupt)))


def test_writer_output_decodes_independently(tmp_path):
    ts = {**tensors(), "scalar": torch.tensor(3.5)}
    path = write_checkpoint(tmp_path / "w.ckpt", ts.items(), crc=True, split_bytes=16)
    records = decode(path.read_bytes())  # also checks the CRC trailer with binascii
    joined: dict[str, bytes] = {}
    for tag, dims, ttype, content in records:
        want = ts[tag]
        assert dims == list(want.shape) and ttype in ("Float32", "Float16", "BFloat16", "Int32", "Int64", "UInt8", "Bool")
        joined[tag] = joined.get(tag, b"") + content
    assert sum(tag == "w.f32" for tag, *_ in records) == 4  # 60 bytes in 16-byte pieces
    for name, t in ts.items():
        assert joined[name] == tensor_bytes(t), name
    i32 = next(r for r in records if r[0] == "i.i32")
    assert np.array_equal(array_of(i32[1], i32[2], joined["i.i32"]), ts["i.i32"].numpy())
    # and a transposed view is written in C order of the view
    view = torch.arange(6.0).reshape(2, 3).t()
    write_checkpoint(tmp_path / "t.ckpt", [("t", view)], crc=False)
    assert decode((tmp_path / "t.ckpt").read_bytes())[0][3] == tensor_bytes(view.contiguous())
    assert torch.equal(read_all(tmp_path / "t.ckpt")["t"], view)


def test_writer_casts_and_round_trips_through_reader(tmp_path):
    ts = tensors()
    write_checkpoint(tmp_path / "c.ckpt", ts.items(), dtype=torch.bfloat16)
    got = read_all(tmp_path / "c.ckpt")
    assert got["w.f32"].dtype == torch.bfloat16 and torch.equal(got["w.f32"], ts["w.f32"].bfloat16())
    assert torch.equal(got["i.i64"], ts["i.i64"])  # integers are not cast


# -- bad input ------------------------------------------------------------------------------

def good_file() -> bytes:
    return tensor_value("backbone.x", torch.arange(12, dtype=torch.float32).reshape(3, 4)) + \
        tensor_value("backbone.y", torch.ones(5, dtype=torch.float16))


@pytest.mark.parametrize("cut", [1, 2, 5, 9, 20, 40, 70, 80, 95])
def test_truncated_file_names_file_and_offset(tmp_path, cut):
    data = good_file()
    assert cut < len(data)
    path = write(tmp_path, data[:cut])
    with pytest.raises(FormatError, match=r"m\.ckpt: (truncated|offset \d+).*offset \d+"):
        read_all(path)


def test_truncated_message_names_the_tensor(tmp_path):
    data = good_file()
    with pytest.raises(FormatError, match=r"truncated: .*tensor 'backbone.x'.*offset \d+"):
        read_all(write(tmp_path, data[:30]))


def test_wrong_tensor_type(tmp_path):
    data = value("backbone.w", [2], "Float33", b"\0" * 8)
    with pytest.raises(FormatError, match=r"offset 0: tensor 'backbone.w' has tensor_type 'Float33'"):
        read_all(write(tmp_path, data))


def test_dims_disagreeing_with_byte_count(tmp_path):
    data = tensor_value("ok", torch.ones(2)) + value("backbone.w", [3, 4], "Float32", b"\0" * 44)
    with pytest.raises(FormatError, match=r"tensor 'backbone.w' \(offset \d+\): dims \[3, 4\] of Float32 need 48 bytes, found 44"):
        read_all(write(tmp_path, data))


@pytest.mark.parametrize("consecutive", [True, False])
def test_duplicate_names(tmp_path, consecutive):
    a, b = tensor_value("a", torch.ones(2)), tensor_value("b", torch.ones(2))
    data = a + a + b if consecutive else a + b + a
    with pytest.raises(FormatError, match=r"tensor 'a' appears twice \(offsets 0 and \d+\)"):
        read_all(write(tmp_path, data))


@pytest.mark.parametrize("magic,mode", [(0x7F3A5ED8, "AES-GCM"), (0x7F3A5ED9, "AES-CBC"), (0x7F3A5EDA, "SM4-CBC")])
def test_encrypted_file_is_refused(tmp_path, magic, mode):
    data = struct.pack("<I", magic) + struct.pack("<i", 60) + bytes(range(60))
    with pytest.raises(FormatError, match=rf"encrypted MindSpore checkpoint \({mode} magic number at offset 0\)"):
        CheckpointReader(write(tmp_path, data))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FormatError, match="byte 0x50 at offset 0, expected 0x0A"):
        CheckpointReader(write(tmp_path, b"PK\x03\x04junk"))
    with pytest.raises(FormatError, match="empty file"):
        CheckpointReader(write(tmp_path, b""))


def test_group_wire_type_and_missing_fields(tmp_path):
    bad_group = field(1, field(1, b"t") + varint(5 << 3 | 3))
    with pytest.raises(FormatError, match="wire type 3"):
        read_all(write(tmp_path, bad_group))
    no_content = field(1, field(1, b"t") + field(2, field(2, b"Float32")))
    with pytest.raises(FormatError, match="tensor 't' lacks its required tensor_content"):
        read_all(write(tmp_path, no_content))


# -- fuzzing ---------------------------------------------------------------------------------

def _mutations():
    base = with_crc(good_file())
    flips = st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)), min_size=1, max_size=4)
    return st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=64).map(lambda b: b"\x0a" + b),
        flips.map(lambda fs: _flip(base, fs)),
        st.integers(0, len(base)).map(lambda n: base[:n]),
        st.tuples(st.integers(0, len(base)), st.binary(min_size=1, max_size=12)).map(
            lambda t: base[:t[0]] + t[1] + base[t[0]:]),
    )


def _flip(base: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(base)
    for i, x in flips:
        out[i] ^= x
    return bytes(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_mutations())
def test_fuzzed_files_raise_only_format_error(tmp_path, data):
    path = tmp_path / "f.ckpt"
    path.write_bytes(data)
    try:
        read_all(path)
    except FormatError:
        pass


def test_writer_errors_are_typed_and_leave_no_file(tmp_path):
    from pangu_fn.errors import ConfigError

    out = tmp_path / "w.ckpt"
    with pytest.raises(ConfigError, match=r"w.ckpt: split_bytes: expected a positive byte count, found 0"):
        write_checkpoint(out, [("a", torch.ones(2))], split_bytes=0)
    with pytest.raises(FormatError, match=r"w.ckpt: tensor 'b': expected a torch.Tensor, found a list"):
        write_checkpoint(out, [("a", torch.ones(2)), ("b", [1.0])])
    with pytest.raises(FormatError, match=r"w.ckpt: tensor 'c': expected a dtype .* found torch.complex64"):
        write_checkpoint(out, [("c", torch.ones(2, dtype=torch.complex64))])
    assert list(tmp_path.iterdir()) == []
