"""`pangu quantize` and `pangu bench --scheme`: outputs that load and run, a JSON report that
matches the saved tensors, recipes from files, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest
from pangu_tools.cli import main

import pangu_fn as pf
from pangu_fn.quant import Int4Weight, Int8Weight
from pangu_fn.tree import flatten


def test_quantize_cli_writes_a_model_that_generates_and_a_matching_report(tmp_path, capsys):
    dst, rep = tmp_path / "q", tmp_path / "report.json"
    assert main(["quantize", "tiny-openpangu", str(dst), "--scheme", "int4", "--group-size", "32", "--asym",
                 "--override", "*.down=int8", "--report", str(rep), "--no-progress"]) == 0
    params, cfg = pf.load(dst)
    assert isinstance(params["blocks"][0]["mlp"]["up"]["weight"], Int4Weight)
    assert params["blocks"][0]["mlp"]["up"]["weight"].zero_points is not None
    assert isinstance(params["blocks"][1]["mlp"]["down"]["weight"], Int8Weight)
    report = json.loads(rep.read_text())
    assert report["bytes_after"] == pf.nbytes(params)
    assert report["bytes_before"] == pf.nbytes(pf.init_params(cfg))
    assert report["compression"] == pytest.approx(report["bytes_before"] / report["bytes_after"], rel=1e-3)
    assert {r["kind"] for r in report["kinds"]} >= {"attention", "mlp", "head", "norm", "bias"}
    out = capsys.readouterr().out
    assert "compression" in out and "int4-g32-asym" in out
    assert main(["generate", "--model", str(dst), "--prompt-ids", "1 2 3", "--max-new-tokens", "4"]) == 0


def test_quantize_cli_reads_a_recipe_file_and_flags_override_it(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"scheme": "int4", "group_size": 32, "keep": ["*.o"], "head": "int8"}))
    dst = tmp_path / "q"
    assert main(["quantize", "tiny-gpt", str(dst), "--recipe", str(recipe), "--group-size", "64",
                 "--no-progress", "--no-eval"]) == 0
    params, _ = pf.load(dst)
    assert params["blocks"][0]["attn"]["q"]["weight"].group_size == 64
    assert isinstance(params["blocks"][0]["attn"]["o"]["weight"], pf.quant.DenseWeight)
    assert isinstance(params["tok_embed"]["weight"], Int8Weight)


def test_quantize_cli_gptq_on_random_calibration_tokens(tmp_path):
    dst = tmp_path / "g"
    assert main(["quantize", "tiny-gpt", str(dst), "--scheme", "gptq", "--group-size", "32", "--calib", "random",
                 "--calib-samples", "4", "--calib-seq-len", "32", "--no-progress"]) == 0
    params, _ = pf.load(dst)
    assert all(isinstance(v, Int4Weight) for k, v in flatten(params).items() if k.startswith("blocks.")
               and k.endswith(".weight") and len(v.shape) == 2)


@pytest.mark.parametrize("argv, message", [
    (["--scheme", "int3"], "unknown quantization scheme"),
    (["--scheme", "int4"], "does not divide"),  # tiny-gpt: K = 64, default group 128
    (["--scheme", "int8", "--keep", "*.nothing"], "matches no linear"),
    (["--scheme", "int8", "--override", "*.down"], "PATTERN=CHOICE"),
    ([], "expected --scheme"),
])
def test_quantize_cli_errors_are_one_line_with_exit_2(tmp_path, capsys, argv, message):
    dst = tmp_path / "bad"
    assert main(["quantize", "tiny-gpt", str(dst), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1 and message in err[-1]
    assert not dst.exists()  # nothing half-written


@pytest.mark.heavy
def test_bench_scheme_rows_with_ratios_and_rss(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-gpt", "--scheme", "bf16,int8", "--scheme", "int4", "--group-size", "32",
                 "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--in-turns", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["engine"] for r in rows] == ["pangu-fn", "pangu-fn bf16", "pangu-fn int8", "pangu-fn int4"]
    assert rows[0]["dtype"] == "float32" and all(r["dtype"] == "bfloat16" for r in rows[1:])
    for r in rows[1:]:
        assert r["decode_vs_first"] == pytest.approx(r["decode_tok_s"] / rows[0]["decode_tok_s"], rel=1e-2, abs=1e-3)
        turns = r["in_turns"]  # timed again, in turns with the unquantized model
        assert turns["decode_vs_base"] == pytest.approx(turns["decode_tok_s"] / turns["base_decode_tok_s"], rel=1e-2,
                                                        abs=1e-3)
        assert r["rss"]["weights_mb"] == pytest.approx(r["weight_mb"], abs=0.1)
        # present, not positive: a model this small can fit in heap the warm-up freed (a flake seen under load)
        assert {"load_peak_mb", "run_peak_mb", "run_peak_vs_weights"} <= set(r["rss"])
    assert rows[3]["weight_mb"] < rows[2]["weight_mb"] < rows[1]["weight_mb"]
