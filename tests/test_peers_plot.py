"""`python -m pangu_tools.peers_plot`: peers runs as a bar chart relative to llama.cpp."""

from __future__ import annotations

import json

import pytest
from pangu_tools import peers_plot

from pangu_fn.errors import InputError


def run(tmp_path, name: str, model: str, speeds: dict[str, dict[str, float]]):
    rows = [{"engine": "pangu-fn", "decode_tok_s": 1.0}]  # the main bench row: no peers_scheme
    rows += [{"engine": e, "peers_scheme": s, "decode_tok_s": v} for s, by in speeds.items() for e, v in by.items()]
    path = tmp_path / name
    path.write_text(json.dumps({"model": model, "results": rows}))
    return path


def test_groups_are_relative_to_llama_cpp_and_the_png_is_written(tmp_path):
    a = run(tmp_path, "a.json", "gpt2-small", {"int4": {"pangu-fn": 240.0, "llama.cpp": 160.0, "onnxruntime": 80.0}})
    b = run(tmp_path, "b.json", "pangu-1b", {"int8": {"pangu-fn": 20.0, "llama.cpp": 16.0},
                                             "int4": {"pangu-fn": 30.0, "onnxruntime": 9.0}})  # no llama.cpp: left out
    data = peers_plot.groups([a, b])
    assert data == [("gpt2-small\nint4", {"pangu-fn": 1.5, "llama.cpp": 1.0, "onnxruntime": 0.5}),
                    ("pangu-1b\nint8", {"pangu-fn": 1.25, "llama.cpp": 1.0})]
    out = tmp_path / "peers.png"
    peers_plot.main([str(a), str(b), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_file_that_is_not_a_peers_run_raises(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="pangu bench --peers"):
        peers_plot.groups([bad])
    with pytest.raises(InputError, match="no peers run"):
        peers_plot.groups([run(tmp_path, "c.json", "m", {"int4": {"pangu-fn": 1.0}})])
