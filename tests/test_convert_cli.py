"""`pangu convert` end to end: round trips, casts, shards, tokenizer copies, --verify; and bad
input: a typed error naming file, tensor and offset, one line on stderr, exit code 2, and no
output (nor temporary file) left behind. Also the strict safetensors header check, fuzzed."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import random_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mindspore_bytes import tensor_value, value, with_crc
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.errors import FormatError
from pangu_fn.io.safetensors_io import read_header
from pangu_fn.tree import flatten


def same(a, b) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture()
def alpha_folder(tmp_path):
    params, cfg = random_model("tiny-alpha", seed=2)
    pf.save(tmp_path / "src", params, cfg, extra_files={"vocab.model": b"not really a model", "vocab.vocab": b"a\t0\n"})
    return tmp_path / "src", params, cfg


def test_round_trips_through_mindspore_and_gpt_pangu(alpha_folder, tmp_path, capsys):
    src, params, cfg = alpha_folder
    assert main(["convert", str(src), str(tmp_path / "out" / "pangu.ckpt"), "--verify"]) == 0
    assert "largest |logit difference| between" in capsys.readouterr().out
    assert (tmp_path / "out" / "vocab.model").read_bytes() == b"not really a model"  # copied beside the .ckpt
    assert main(["convert", str(tmp_path / "out" / "pangu.ckpt"), str(tmp_path / "back"), "--config", str(src)]) == 0
    assert main(["convert", str(tmp_path / "back"), str(tmp_path / "hf"), "--to", "gpt_pangu", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith(": 0")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "again")]) == 0
    for folder in ("back", "hf", "again"):
        assert (tmp_path / folder / "vocab.vocab").read_bytes() == b"a\t0\n", folder
    p, c = pf.load(tmp_path / "again")
    assert c == cfg and same(p, params)


def test_cast_and_shard(alpha_folder, tmp_path, capsys):
    src, params, _cfg = alpha_folder
    assert main(["convert", str(src), str(tmp_path / "bf"), "--dtype", "bf16", "--shard-size", "100KB",
                 "--verify"]) == 0
    index = json.loads((tmp_path / "bf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    p, _c = pf.load(tmp_path / "bf")
    assert {t.dtype for t in flatten(p).values()} == {torch.bfloat16}
    assert same(p, pf.astype(params, torch.bfloat16))
    diff = float(capsys.readouterr().out.rsplit(":", 1)[1])
    assert 0 < diff < 1.0  # bf16 rounding shows, and nothing more


def test_existing_destination_needs_overwrite(alpha_folder, tmp_path, capsys):
    src, _, _ = alpha_folder
    (tmp_path / "dst").mkdir()
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 0  # an empty folder holds no data
    assert main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "dst"), "--overwrite"]) == 0
    assert (tmp_path / "dst" / "config.json").is_file()


def bad_ckpt(kind: str) -> bytes:
    good = tensor_value("backbone.word_embedding.embedding_table", torch.ones(4, 3)) + \
        tensor_value("backbone.layernorm.gamma", torch.ones(3))
    return {
        "truncated-early": good[:7],
        "truncated-content": good[:60],
        "truncated-crc": with_crc(good)[:-3] + b"\x00\x00\x00",
        "tensor-type": value("backbone.x", [2], "Float99", b"\0" * 8),
        "dims": value("backbone.x", [2, 3], "Float32", b"\0" * 20),
        "duplicate": good + tensor_value("backbone.layernorm.gamma", torch.ones(3)),
        "encrypted": struct.pack("<I", 0x7F3A5ED8) + b"\x10\x00\x00\x00" + bytes(16),
    }[kind]


MESSAGES = {
    "truncated-early": r"truncated: .*offset \d+",
    "truncated-content": r"truncated: .*tensor 'backbone.word_embedding.embedding_table'.*offset \d+",
    "truncated-crc": r"CRC-32 mismatch: the trailer at offset \d+",
    "tensor-type": r"offset 0: tensor 'backbone.x' has tensor_type 'Float99'",
    "dims": r"tensor 'backbone.x' \(offset 0\): dims \[2, 3\] of Float32 need 24 bytes, found 20",
    "duplicate": r"tensor 'backbone.layernorm.gamma' appears twice \(offsets \d+ and \d+\)",
    "encrypted": r"encrypted MindSpore checkpoint \(AES-GCM magic number at offset 0\)",
}


def run_cli(capsys, *args: str) -> tuple[int, list[str]]:
    code = main(["convert", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def assert_nothing_left(folder, keep: set[str]) -> None:
    assert {f.name for f in folder.iterdir()} == keep


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_bad_mindspore_files(tmp_path, capsys, kind):
    import re

    f = tmp_path / "bad.ckpt"
    f.write_bytes(bad_ckpt(kind))
    code, err = run_cli(capsys, str(f), str(tmp_path / "out"), "--config", "tiny-alpha")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("pangu convert: error: ") and str(f) in err[0]
    assert re.search(MESSAGES[kind], err[0]), err[0]
    assert_nothing_left(tmp_path, {"bad.ckpt"})


def test_hostile_safetensors_header(tmp_path, capsys):
    params, cfg = random_model("tiny-gpt")
    pf.save(tmp_path / "m", params, cfg)
    st_file = tmp_path / "m" / "model.safetensors"
    data = st_file.read_bytes()
    st_file.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])  # header length past the file
    code, err = run_cli(capsys, str(tmp_path / "m"), str(tmp_path / "out"))
    assert code == 2 and len(err) == 1
    assert f"{st_file}: header length {len(data) * 2} at offset 0 runs past the end of the file" in err[0]
    assert_nothing_left(tmp_path, {"m"})


def test_pt_needing_arbitrary_unpickling(tmp_path, capsys):
    import argparse

    params, _cfg = random_model("tiny-gpt")
    torch.save({"model": flatten(params), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "train.pt")
    code, err = run_cli(capsys, str(tmp_path / "train.pt"), str(tmp_path / "out"), "--config", "tiny-gpt")
    assert code == 2 and len(err) == 1
    assert f"{tmp_path / 'train.pt'}: needs arbitrary unpickling, which pangu-fn refuses" in err[0]
    assert "argparse.Namespace" in err[0]
    assert_nothing_left(tmp_path, {"train.pt"})


def test_failure_while_writing_leaves_nothing(alpha_folder, tmp_path, capsys):
    src, _, _ = alpha_folder
    # a gpt-family model cannot be written as MindSpore PanGu-α: the error comes after opening
    params, cfg = random_model("tiny-gpt")
    pf.save(tmp_path / "gpt", params, cfg)
    code, err = run_cli(capsys, str(tmp_path / "gpt"), str(tmp_path / "x.ckpt"))
    assert code == 2 and "writes PanGu-α" in err[0]
    assert not (tmp_path / "x.ckpt").exists() and not list(tmp_path.glob(".x.ckpt*"))
    # a tensor that breaks mid-stream: truncate the source's safetensors after opening it
    from pangu_fn.io import writers
    from pangu_fn.io.checkpoint import open_source

    source = open_source(src)
    (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(FormatError, match="expected .* bytes at offset"):
        writers.write_ours(source, tmp_path / "half")
    assert not list(tmp_path.glob("*half*"))


# -- safetensors header check ------------------------------------------------------------------

def st_bytes(header: dict, buffer: bytes, declared: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + buffer


@pytest.mark.parametrize("header,buffer,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, r"tensor 'b' at offset \d+ overlaps"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "leaves a hole"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'a': shape \[3\] of F32 needs 12"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, r"tensor 'a': dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, "trailing bytes"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings"),
])
def test_safetensors_header_rules(tmp_path, header, buffer, match):
    f = tmp_path / "x.safetensors"
    f.write_bytes(st_bytes(header, buffer))
    with pytest.raises(FormatError, match=match):
        read_header(f)


def test_safetensors_duplicate_names_and_huge_header(tmp_path):
    f = tmp_path / "x.safetensors"
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0")
    with pytest.raises(FormatError, match="names 'a' twice"):
        read_header(f)
    f.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(FormatError, match="exceeds the limit"):
        read_header(f)
    deep = b"[" * 100_000 + b"]" * 100_000
    f.write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(FormatError, match="nests JSON too deeply"):
        read_header(f)


def _good_safetensors() -> bytes:
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}
    return st_bytes(header, bytes(range(22)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=120),
    st.tuples(st.integers(0, 200), st.binary(max_size=100)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.lists(st.tuples(st.integers(0, len(_good_safetensors()) - 1), st.integers(1, 255)), min_size=1,
             max_size=3).map(lambda fs: bytes(b ^ dict(fs).get(i, 0) for i, b in enumerate(_good_safetensors()))),
    st.integers(0, len(_good_safetensors())).map(lambda n: _good_safetensors()[:n]),
))
def test_fuzzed_safetensors_raise_only_format_error(tmp_path, data):
    from pangu_fn.io.safetensors_io import SafetensorsFile

    f = tmp_path / "f.safetensors"
    f.write_bytes(data)
    try:
        st_file = SafetensorsFile(f)
        for name in st_file.keys():  # noqa: SIM118  (keys() only, not a mapping)
            st_file.get(name)
    except FormatError:
        pass
