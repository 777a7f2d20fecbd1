"""`pangu generate`, `pangu info` and `pangu bench` outputs."""

from __future__ import annotations

import json

from pangu_tools.cli import main

import pangu_fn as pf


def test_generate_json_matches_the_library(capsys):
    assert main(["generate", "--model", "tiny-openpangu", "--prompt-ids", "1 2 3; 9", "--max-new-tokens",
                 "5", "--no-eos", "--json", "--weights-seed", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    ref = pf.generate(pf.init_params(cfg, seed=3), cfg, [[1, 2, 3], [9]], 5, eos_token_ids=())
    assert [c["tokens"] for c in out["completions"]] == [c.tokens for c in ref]
    assert [c["finish_reason"] for c in out["completions"]] == ["length", "length"]


def test_generate_streams_one_token_per_line(capsys):
    assert main(["generate", "--model", "tiny-gpt", "--prompt-ids", "4 5", "--max-new-tokens", "4",
                 "--no-eos", "--stream"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 4 and all(line.strip().isdigit() for line in lines)


def test_info_reports_sizes(capsys):
    assert main(["info", "pangu-1b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "gpt" and info["config"]["num_layers"] == 24
    # 24 x 12 x 2048^2 + embeddings (40000 + 1024) x 2048 + norms and biases
    assert abs(info["parameters"] - 1.2926e9) < 1e6
    assert info["bytes_by_dtype"] == {"float32": 4 * info["parameters"]}


def test_bench_writes_json_with_medians_and_ratios(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "tiny-gpt", "--compare", "hf", "--repeats", "2", "--warmup", "0",
                 "--new-tokens", "6", "--prompt-len", "5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [r["engine"] for r in rows] == ["pangu-fn", "transformers"]
    for r in rows:
        assert len(r["runs"]["decode_tok_s"]) == 2 and r["decode_tok_s"] > 0 and r["prefill_ms"] > 0
    assert rows[1]["decode_vs_first"] == round(rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"], 3)


def test_pangu_run_never_imports_torch(tmp_path):
    """`pangu run` (the ONNX Runtime path) must work where torch is not installed."""
    import subprocess
    import sys

    code = ("import sys; from pangu_tools.cli import main; rc = main(['run', sys.argv[1], '--prompt-ids', '1 2']); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "no-bundle")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2" and proc.stderr.startswith("pangu run: error:")
