"""pangu_runtime without an export: a hand-made ONNX bigram bundle (logits are a row of a
table, the cache records the tokens), checked against numpy; sampling against pangu_fn's;
hostile bundles; and that the runtime never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pangu_runtime import (
    BundleFileError,
    BundleFormatError,
    BundleHashError,
    BundlePathError,
    BundleVersionError,
    GenerationError,
    PromptLookup,
    SamplingParams,
    Session,
    draft_tokens,
    probabilities,
)
from pangu_runtime.manifest import FORMAT, VERSION, sha256_file

import pangu_fn as pf

V = 32


def bigram_table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(V, V)).astype(np.float32) * 3


def write_bigram_bundle(folder: Path, table: np.ndarray, eos: int = 2) -> Path:
    """A growing-layout graph: logits = table[input_ids]; present = past ++ float(tokens)."""
    folder.mkdir(parents=True)
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
    pos = helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])
    pk = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 1, "past", 1])
    pv = helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["batch", 1, "past", 1])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0),
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axes"], ["new"]),  # [B, 1, T, 1]
        helper.make_node("Concat", ["past_key_values.0.key", "new"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new"], ["present.0.value"], axis=2),
    ]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 1, "total", 1]),
            helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", 1, "total", 1])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.array([1, 3], np.int64), "axes")]
    graph = helper.make_graph(nodes, "bigram", [ids, mask, pos, pk, pv], outs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx")
    manifest = {
        "format": FORMAT, "version": VERSION, "target": "ort",
        "config": {"vocab_size": V, "max_seq_len": 64},
        "model": {"file": "model.onnx", "external_data": [], "opset": 18, "dtype": "float32"},
        "inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"],
        "outputs": ["logits", "present.0.key", "present.0.value"],
        "cache": {"layout": "growing", "blocks": 1, "kv_heads": [1], "head_dim": 1, "dtype": "float32"},
        "generation": {"eos_token_ids": [eos]},
        "files": {"model.onnx": {"sha256": sha256_file(folder / "model.onnx"), "bytes": 0}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def bigram_greedy(table: np.ndarray, prompt: list[int], n: int, eos: set[int]) -> tuple[list[int], str]:
    out, tok = [], prompt[-1]
    for _ in range(n):
        tok = int(table[tok].argmax())
        out.append(tok)
        if tok in eos:
            return out, "eos"
    return out, "length"


@pytest.fixture(scope="module")
def bigram(tmp_path_factory) -> tuple[Path, np.ndarray]:
    table = bigram_table()
    return write_bigram_bundle(tmp_path_factory.mktemp("rt") / "bigram", table), table


def test_generate_matches_numpy_reference_ragged_with_eos(bigram):
    path, table = bigram
    s = Session(path)
    prompts = [[5, 9, 1, 7], [3], [30, 11]]
    eos = {int(table[t].argmax()) for t in (4, 8)}  # some rows will stop early
    got = s.generate(prompts, 12, eos_token_ids=eos)
    for p, c in zip(prompts, got):
        assert (c.tokens, c.finish_reason) == bigram_greedy(table, p, 12, eos)
    # the preallocated buffers carry the cache across calls: this toy graph appends every
    # token it is fed, so after a padded prefill and two steps the cache holds all of them
    cache = s.new_cache(len(prompts), 8)
    padded = s._pad(prompts, 3)
    s.forward(padded, cache)
    cache.lengths[:] = [len(p) for p in prompts]
    s.forward(np.array([[1], [2], [3]]), cache)
    s.forward(np.array([[4], [5], [6]]), cache)
    keys = cache._view(cache.side, 0, cache.filled)[:, 0, :, 0]
    assert keys.tolist() == np.concatenate([padded, [[1, 4], [2, 5], [3, 6]]], axis=1).tolist()


def test_stream_events_and_default_eos(bigram):
    path, table = bigram
    s = Session(path)
    events = list(s.stream([[6]], 10))  # eos None -> the manifest's [2]
    want, reason = bigram_greedy(table, [6], 10, {2})
    assert [e.token for e in events] == want and events[-1].finish_reason == reason
    assert all(e.finish_reason is None for e in events[:-1])


def test_prompt_lookup_greedy_is_identical_and_accepts(bigram):
    path, _ = bigram
    s = Session(path)
    prompts = [[5, 9, 1, 7, 5, 9, 1], [12, 4, 12, 4, 12]]
    plain = s.generate(prompts, 20, eos_token_ids=())
    fast = s.generate(prompts, 20, eos_token_ids=(), lookup=PromptLookup(num_draft=4))
    assert [c.tokens for c in fast] == [c.tokens for c in plain]
    assert s.lookup_stats["accepted"] > 0 and s.lookup_stats["steps"] < 20


def test_sampling_is_seeded_and_respects_top_k(bigram):
    path, table = bigram
    s = Session(path)
    sp = SamplingParams(temperature=1.0, top_k=3)
    a = s.generate([[1], [2]], 16, sp, seed=7, eos_token_ids=())
    b = s.generate([[1], [2]], 16, sp, seed=7, eos_token_ids=())
    c = s.generate([[1], [2]], 16, sp, seed=8, eos_token_ids=())
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
    for comp, p in zip(a, [[1], [2]]):
        prev = p[-1]
        for tok in comp.tokens:
            assert tok in np.argsort(-table[prev])[:3]
            prev = tok


@pytest.mark.parametrize("sp", [SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(0.9, top_p=0.6),
                                SamplingParams(1.0, top_k=10, top_p=0.8), SamplingParams(0.0)])
def test_probabilities_match_pangu_fn(sp):
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 2
    ref = pf.sampling.probabilities(torch.from_numpy(logits), pf.SamplingParams(
        sp.temperature, sp.top_k, sp.top_p, sp.repetition_penalty)).numpy()
    np.testing.assert_allclose(probabilities(logits, sp), ref, atol=1e-6)


def test_repetition_penalty_matches_pangu_fn():
    from pangu_runtime.sampling import penalize

    logits = np.random.default_rng(1).normal(size=(3, 20)).astype(np.float32)
    seen = np.random.default_rng(2).random((3, 20)) < 0.3
    ref = pf.sampling.penalize(torch.from_numpy(logits), torch.from_numpy(seen), 1.3).numpy()
    np.testing.assert_allclose(penalize(logits, seen, 1.3), ref, atol=1e-7)


def test_draft_tokens():
    lookup = PromptLookup(num_draft=3, max_ngram=2)
    assert draft_tokens([1, 2, 3, 4, 9, 1, 2], lookup) == [3, 4, 9]  # bigram (1, 2) recurs
    assert draft_tokens([7, 5, 8, 7, 5, 6, 5], lookup) == [6, 5]  # most recent unigram match of 5
    assert draft_tokens([1, 2, 3], lookup) == []


def test_bad_prompts_are_refused(bigram):
    s = Session(bigram[0])
    for prompts, n in [([], 4), ([[]], 4), ([[V]], 4), ([[1] * 60], 10), ([[1]], 0)]:
        with pytest.raises(GenerationError):
            s.generate(prompts, n)
    with pytest.raises(GenerationError):
        SamplingParams(top_p=0)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_hostile_bundles_are_refused(bigram, tmp_path):
    src = bigram[0]
    b = _copy(src, tmp_path / "hash")
    with open(b / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleHashError, match="sha256"):
        Session(b)

    b = _copy(src, tmp_path / "dotdot")
    _edit_manifest(b, lambda m: m["files"].update({"../secret.onnx": {"sha256": "0" * 64}}))
    with pytest.raises(BundlePathError, match="outside"):
        Session(b)

    b = _copy(src, tmp_path / "abs")
    _edit_manifest(b, lambda m: m["model"].update(file="/etc/passwd"))
    with pytest.raises(BundlePathError):
        Session(b)

    b = _copy(src, tmp_path / "missing")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleFileError, match="missing"):
        Session(b)

    b = _copy(src, tmp_path / "newer")
    _edit_manifest(b, lambda m: m.update(version=VERSION + 1))
    with pytest.raises(BundleVersionError, match="newer"):
        Session(b)

    b = _copy(src, tmp_path / "unlisted")
    _edit_manifest(b, lambda m: m["files"].pop("model.onnx"))
    with pytest.raises(BundleFormatError, match="not listed"):
        Session(b)

    b = _copy(src, tmp_path / "symlink")
    (tmp_path / "outside.onnx").write_bytes((b / "model.onnx").read_bytes())
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    with pytest.raises(BundlePathError, match="outside"):
        Session(b)


def test_runtime_never_imports_torch(bigram):
    code = ("import sys; from pangu_runtime import Session, SamplingParams, PromptLookup; "
            f"s = Session({str(bigram[0])!r}); s.generate([[1, 2], [3]], 8); "
            "s.generate([[1, 2]], 8, SamplingParams(0.8, top_p=0.9), lookup=PromptLookup()); "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.') or m.startswith('pangu_fn')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
