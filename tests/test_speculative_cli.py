"""`pangu generate --draft` and `pangu bench --draft`: same tokens as plain generation,
statistics printed, typed errors as exit code 2."""

from __future__ import annotations

import json

from pangu_tools.cli import main

import pangu_fn as pf


def generate_json(capsys, *extra: str) -> dict:
    assert main(["generate", "--model", "tiny-openpangu", "--prompt-ids", "5 6 7 5 6 7 5; 9", "--max-new-tokens",
                 "12", "--no-eos", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_with_each_drafter_prints_plain_greedy_tokens_and_stats(capsys, tmp_path):
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    params = pf.init_params(cfg, seed=0)
    draft = pf.save(tmp_path / "draft", params, cfg)  # the target itself: every draft is accepted
    plain = generate_json(capsys)["completions"]
    for spec in (str(draft), "self", "self:1", "lookup", "lookup:2", f"lookup+{draft}", "lookup+self:1"):
        out = generate_json(capsys, "--draft", spec, "--k", "3", "--adaptive")
        assert out["completions"] == plain, spec
        stats = out["speculative"]
        assert stats["draft"] == spec and stats["k"] == 3 and stats["adaptive"] is True
        assert stats["accepted"] <= stats["drafted"] and stats["steps"] >= 1
    stats = generate_json(capsys, "--draft", str(draft), "--k", "3")["speculative"]
    assert stats["acceptance_rate"] == 1.0 and stats["tokens_per_call"] > 3


def test_generate_draft_errors_exit_2(capsys, tmp_path):
    other = pf.ModelConfig.preset("tiny-openpangu").replace(vocab_size=300)
    path = pf.save(tmp_path / "other", pf.init_params(other), other)
    for extra in (["--draft", "lookup", "--k", "0"], ["--draft", str(path)], ["--draft", "self:9"],
                  ["--draft", "nowhere"], ["--draft", "lookup+lookup"]):
        assert main(["generate", "--model", "tiny-openpangu", "--prompt-ids", "1 2", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pangu generate: error:") and len(err.strip().splitlines()) == 1


def test_bench_draft_rows(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "tiny-gpt", "--draft", "lookup", "--draft", "self", "--adaptive",
                 "--spec-prompts", "random", "--prompt-count", "2", "--repeats", "1", "--warmup", "0",
                 "--new-tokens", "8", "--prompt-len", "6", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    spec = [r for r in rows if r["engine"].endswith("[random]")]
    assert [r["engine"] for r in spec] == ["plain greedy [random]", "speculative lookup k=4 [random]",
                                            "speculative lookup k<=4 [random]", "speculative self k=4 [random]",
                                            "speculative self k<=4 [random]"]
    for r in spec:
        assert r["decode_tok_s"] > 0 and len(r["per_prompt_decode_tok_s"]) == 2
        assert r["vs_plain"] == round(r["decode_tok_s"] / spec[0]["decode_tok_s"], 3)
    assert all(0 <= r["acceptance_rate"] <= 1 and r["tokens_per_call"] >= 1 for r in spec[1:])
    assert [r.get("warm_start") for r in spec] == [None, None, True, None, True]  # adaptive rows start warm
    lookup = spec[1]  # replayed from the plain greedy tokens, the fixed-K lookup row's own figure
    assert lookup["lookup_replay_tokens_per_call"] == lookup["tokens_per_call"]
    assert lookup["lookup_best_match_tokens_per_call"] >= lookup["tokens_per_call"]
    assert [r for r in spec if "lookup_replay_tokens_per_call" in r] == [lookup]
    assert 0 <= lookup["prompts_equal_to_plain"] <= 2
    assert main(["bench", "--model", "tiny-gpt", "--draft", "lookup", "--repeats", "1"]) == 2  # no held-out text
    assert "heldout.jsonl" in capsys.readouterr().err
