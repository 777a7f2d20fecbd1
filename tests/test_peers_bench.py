"""`pangu bench --peers` orchestration on a tiny model: one process per engine, every scheme's
rows in order, the fp32 engines agreeing on the greedy tokens, per-process peak RSS and the
ratios to the fastest peer. llama.cpp rows appear only where llama-cpp-python is installed."""

from __future__ import annotations

from argparse import Namespace

import pytest
from helpers import random_model
from pangu_tools import peers_bench

import pangu_fn as pf


def test_peer_rows_one_process_per_engine(tmp_path):
    params, cfg = random_model("tiny-gpt")
    args = Namespace(peers=str(tmp_path), peers_schemes="fp32,int4", threads=1, new_tokens=2, repeats=1,
                     warmup=0, group_size=32, asym=False, quant_head="keep", accuracy_level=0)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    rows = peers_bench.peer_rows(params, cfg, args, prompt)

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


def test_unknown_peer_scheme_is_a_config_error():
    params, cfg = random_model("tiny-gpt")
    args = Namespace(peers="", peers_schemes="fp8")
    with pytest.raises(pf.ConfigError, match="fp8.*fp32"):
        peers_bench.peer_rows(params, cfg, args, [1, 2])
