"""`pangu bench --peers` orchestration on a tiny model: every peer's file built in a child
process of its own, one process per engine, every scheme's rows in order, the fp32 engines
agreeing on the greedy tokens, per-process peak RSS and the ratios to the fastest peer.
llama.cpp rows appear only where llama-cpp-python is installed."""

from __future__ import annotations

import subprocess
import tempfile
from argparse import Namespace
from pathlib import Path

import pangu_export.gguf
import pytest
from helpers import random_model
from pangu_tools import ort_bench, peers_bench, peers_build

import pangu_fn as pf
import pangu_fn.quant


def _built_here(*_: object, **__: object) -> None:
    raise AssertionError("a peer's file was built in the bench process, not in a child")


@pytest.mark.heavy
def test_peer_rows_one_process_per_engine(tmp_path, monkeypatch):
    params, cfg = random_model("tiny-gpt")
    args = Namespace(peers=str(tmp_path), peers_schemes="fp32,int4", threads=1, new_tokens=2, repeats=1,
                     warmup=0, group_size=32, asym=False, quant_head="keep", accuracy_level=0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    peers = peers_bench.prepare(params, cfg, args, prompt)
    # the builders fail in this process; the child processes import their own, unpatched ones
    for module, name in [(pangu_fn.quant, "quantize"), (pangu_export.gguf, "export_gguf"), (ort_bench, "hf_model"),
                         (ort_bench, "export_hf_onnx"), (ort_bench, "quantize_plain")]:
        monkeypatch.setattr(module, name, _built_here)
    rows = peers_bench.peer_rows(peers, args, prompt)

    peers = ["llama.cpp", "onnxruntime"] if peers_bench.llama_cpp_installed() else ["onnxruntime"]
    assert [(r["peers_scheme"], r["engine"]) for r in rows] == [
        (s, e) for s in ("fp32", "int4") for e in ["pangu-fn", *peers]]
    # independent engines on the same fp32 weights: the same greedy tokens as pangu-fn in this process
    assert all(r["same_tokens_as_fp32"] for r in rows if r["peers_scheme"] == "fp32")
    assert (tmp_path / "pangu-int4" / "config.json").is_file()  # what the pangu-fn child loaded
    assert pf.load(tmp_path / "pangu-int4")[1] == cfg
    for scheme in ("fp32", "int4"):
        ours, *others = [r for r in rows if r["peers_scheme"] == scheme]
        best = max(r["decode_tok_s"] for r in others)
        assert ours["vs_best_peer"] == round(ours["decode_tok_s"] / best, 3)
        assert ours["meets_goal"] == (ours["decode_tok_s"] >= best)
        # each process's own peak: the torch-free ONNX Runtime child holds far less than
        # the pangu-fn child (torch) or this test process
        ort = next(r for r in others if r["engine"] == "onnxruntime")
        assert 0 < ort["peak_rss_mb"] < ours["peak_rss_mb"]
    # every file but the fp32 tree saved by prepare() came from a child that reported its own peak
    built = [r for r in rows if not (r["engine"] == "pangu-fn" and r["peers_scheme"] == "fp32")]
    assert all(r["build_peak_rss_mb"] > 0 for r in built)
    assert "build_peak_rss_mb" not in rows[0]
    assert (tmp_path / "onnx-int4" / "model.onnx.data").is_file()  # int4 graph with external data


def test_a_childs_error_keeps_its_type(tmp_path, monkeypatch):
    step = {"step": "pangu", "source": str(tmp_path / "missing"), "out": str(tmp_path / "out"), "scheme": "int8",
            "options": {"group_size": 32, "asym": False, "quant_head": "keep", "accuracy_level": 0}}
    scratch, seen = tmp_path / "tmp", []  # the child's TMPDIR: a folder of the call, removed after it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run = subprocess.run

    def recording(*args, **kwargs):
        seen.append(Path(kwargs["env"]["TMPDIR"]))
        assert seen[-1].is_dir() and seen[-1].parent == scratch
        return run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording)
    with pytest.raises(pf.FormatError, match="missing.*config.json"):
        peers_build.build_in_child(step)
    assert not (tmp_path / "out").exists() and len(seen) == 1 and list(scratch.iterdir()) == []


def test_unknown_peer_scheme_is_a_config_error():
    params, cfg = random_model("tiny-gpt")
    args = Namespace(peers="", peers_schemes="fp8")
    with pytest.raises(pf.ConfigError, match="fp8.*fp32"):
        peers_bench.prepare(params, cfg, args, [1, 2])
