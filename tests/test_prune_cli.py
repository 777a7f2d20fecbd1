"""`pangu prune`: outputs that load, a JSON report that matches the saved tensors, one-line
errors with exit status 2, and `pangu bench --prune-structured`."""

from __future__ import annotations

import json

import pytest
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.params import layer_sizes
from pangu_fn.prune import count_for
from pangu_fn.prune.scope import get, scope_names


def test_cli_magnitude_writes_model_and_report(tmp_path, capsys):
    dst, rep = tmp_path / "pruned", tmp_path / "report.json"
    rc = main(["prune", "tiny-openpangu", str(dst), "--method", "magnitude", "--sparsity", "0.4",
               "--tensors", "blocks,head", "--report", str(rep), "--no-progress"])
    assert rc == 0
    params, _cfg = pf.load(dst)
    report = json.loads(rep.read_text())
    names = scope_names(params, ("blocks", "head"))
    assert [t["name"] for t in report["tensors"]] == names
    for t in report["tensors"]:
        w = get(params, t["name"])
        assert int((w == 0).sum()) == t["zeros"] == count_for(0.4, w.numel())
    assert "sparsity 40.00%" in capsys.readouterr().out


def test_cli_structured_and_iterative_models_load_and_run(tmp_path):
    dst = tmp_path / "s"
    assert main(["prune", "tiny-gpt", str(dst), "--method", "structured", "--heads", "0.5", "--ffn", "0.5",
                 "--importance", "taylor", "--allocation", "global", "--calib", "random",
                 "--calib-samples", "4", "--calib-seq-len", "16", "--no-progress"]) == 0
    params, cfg = pf.load(dst)
    assert sum(layer_sizes(b, cfg).num_heads for b in params["blocks"]) == 4
    assert main(["generate", "--model", str(dst), "--prompt-ids", "1 2 3", "--max-new-tokens", "4"]) == 0
    dst2 = tmp_path / "i"
    assert main(["prune", "tiny-gpt", str(dst2), "--method", "iterative", "--sparsity", "0.6", "--rounds", "2",
                 "--recovery-steps", "2", "--batch-size", "2", "--seq-len", "16", "--calib", "random",
                 "--no-progress"]) == 0
    params, _ = pf.load(dst2)
    w = params["blocks"][0]["mlp"]["up"]["weight"]
    assert int((w == 0).sum()) == count_for(0.6, w.numel())


@pytest.mark.parametrize("argv,match", [
    (["--method", "magnitude", "--sparsity", "1.5"], "sparsity"),
    (["--method", "n:m", "--nm", "4:4"], "n < m"),
    (["--method", "n:m", "--nm", "two:four"], "n:m spec"),
    (["--method", "structured", "--heads", "0.9"], "every"),
    (["--method", "wanda", "--tensors", "blocks"], "tokenizer"),  # a preset has no text to calibrate on
    (["--method", "magnitude", "--tensors", "blocks,lm"], "tensors"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, match):
    dst = tmp_path / "never"
    rc = main(["prune", "tiny-openpangu", str(dst), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("pangu prune: error:") and match in err[-1]
    assert not dst.exists()


def test_bench_measures_dense_and_structurally_pruned(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-openpangu", "--prune-structured", "heads=0.5,ffn=0.5",
                 "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    dense, pruned = result["results"][0], result["results"][1]
    assert pruned["engine"] == "pangu-fn pruned heads=0.5,ffn=0.5"
    assert pruned["decode_vs_first"] == round(pruned["decode_tok_s"] / dense["decode_tok_s"], 3)
    info = result["pruned"]
    assert info["parameters_after"] < info["parameters_before"] == result["parameters"]
    assert info["widths"] == [{"heads_after": 2, "kv_heads_after": 1, "ffn_after": 64}] * 2
