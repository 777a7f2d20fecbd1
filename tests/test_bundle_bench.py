"""`pangu bench --bundle`: the runtime, the plain ONNX loop and onnxruntime-genai on the same
weights, timed in a torch-free child process, with ratios against the runtime."""

import json

import pytest
from pangu_tools.cli import main


@pytest.mark.heavy
def test_bench_bundle_rows_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-gpt", "--bundle", str(tmp_path / "bundles"), "--bundle-scheme", "fp32,int4",
                 "--group-size", "32", "--new-tokens", "3", "--prompt-len", "4", "--repeats", "2", "--warmup", "0", "--threads", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    engines = [r["engine"] for r in rows]
    assert engines == ["pangu-fn", "pangu-runtime fp32", "onnx plain loop fp32", "onnxruntime-genai fp32",
                       "pangu-runtime int4", "onnx plain loop int4", "onnxruntime-genai int4"]
    for scheme, first in (("fp32", 1), ("int4", 4)):
        ours = rows[first]
        assert ours["bundle"] == str(tmp_path / "bundles" / f"bundle-{scheme}")
        assert len(ours["runs"]["decode_tok_s"]) == 2  # the repeats, taken in turns with the other engines
        for other in rows[first + 1: first + 3]:
            assert other["runtime_decode_vs_this"] == pytest.approx(ours["decode_tok_s"] / other["decode_tok_s"],
                                                                    rel=1e-2, abs=1e-3)
            assert other["runtime_decode_vs_this_per_repeat"] == pytest.approx(
                [a / b for a, b in zip(ours["runs"]["decode_tok_s"], other["runs"]["decode_tok_s"])], rel=1e-2, abs=1e-3)


def test_bench_worker_that_fails_reports_its_error(tmp_path):
    from pangu_tools.ort_bench import _Worker

    job = {"engine": "pangu-runtime", "bundle": str(tmp_path / "missing"), "threads": 1, "prompt": [1, 2],
           "new_tokens": 2, "warmup": 1}
    with pytest.raises(RuntimeError, match="child process failed.*missing"):
        _Worker(job)
