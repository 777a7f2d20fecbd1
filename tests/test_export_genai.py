"""Bundles that onnxruntime-genai (a runtime we did not write) runs unmodified: its greedy
tokens equal `pangu_fn.generate` for every family and for int4, and the demo model's text
goes in and out through the converted tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import FAMILIES, random_model
from pangu_export import export_bundle
from test_export import ort_bundle, shared_dir  # noqa: F401  (shared_dir is a fixture)

import pangu_fn as pf

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")

PROMPT = [5, 17, 42, 9, 5, 17, 42, 9, 5]
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "target"


def genai_greedy(bundle: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_greedy_equals_generate(shared_dir, family):  # noqa: F811
    params, cfg = random_model(family)
    bundle = ort_bundle(shared_dir, family)
    config = json.loads((bundle / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == cfg.num_blocks
    assert config["search"]["past_present_share_buffer"] is True  # one KV buffer, written in place
    want = pf.generate(params, cfg, [PROMPT], 32)[0].tokens
    assert genai_greedy(bundle, PROMPT, 32) == want


def test_genai_int4_bundle(shared_dir):  # noqa: F811
    from test_export_quant import SYMMETRIC, ort_quant_bundle, quantized

    q, cfg = quantized(SYMMETRIC)  # int4 MatMulNBits everywhere, the tied head / embedding too
    bundle = ort_quant_bundle(shared_dir, "symmetric")
    assert genai_greedy(bundle, PROMPT, 32) == pf.generate(q, cfg, [PROMPT], 32)[0].tokens


def test_pruned_model_with_uneven_kv_heads_is_reported(tmp_path):
    params, cfg = random_model("tiny-openpangu")
    block = params["blocks"][1]["attn"]
    d = cfg.head_dim  # drop one KV head (and its two query heads) from block 1
    block["k"] = {k: v[d:] for k, v in block["k"].items()}
    block["v"] = {k: v[d:] for k, v in block["v"].items()}
    block["q"] = {k: v[2 * d:] for k, v in block["q"].items()}
    block["o"] = {"weight": block["o"]["weight"][:, 2 * d:], "bias": block["o"]["bias"]}
    m = export_bundle(params, cfg, tmp_path / "pruned", "ort", progress=False)
    assert m["cache"]["kv_heads"] == [2, 1]
    assert any("different KV head counts" in note for note in m["genai"]["notes"])
    from pangu_runtime import Session  # our runtime runs it all the same

    want = pf.generate(params, cfg, [PROMPT], 16)[0].tokens
    assert Session(tmp_path / "pruned").generate([PROMPT], 16)[0].tokens == want


def test_genai_text_in_text_out_on_demo(shared_dir):  # noqa: F811
    from test_export import demo_bundle

    bundle, params, cfg = demo_bundle(shared_dir)
    assert json.loads((bundle / "manifest.json").read_text())["genai"]["tokenizer"] == "tokenizer.json"
    from pangu_fn.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    text = "The Python tutorial explains how to"
    ids = tok.encode(text, add_bos=True)
    want = pf.generate(params, cfg, [ids], 24)[0].tokens
    model = og.Model(str(bundle))
    og_tok = og.Tokenizer(model)
    assert list(og_tok.encode(text)) == tok.encode(text)  # the converted tokenizer.json agrees
    assert genai_greedy(bundle, ids, 24) == want
    assert og_tok.decode(np.array(want, dtype=np.int32)).strip() == tok.decode(want).strip() != ""


def test_unreadable_tokenizer_model_is_a_format_error(tmp_path):
    from pangu_export.genai import sentencepiece_to_json

    (tmp_path / "tokenizer.model").write_bytes(b"\xff\x00 not a ModelProto")
    with pytest.raises(pf.FormatError, match=r"tokenizer.model: expected a SentencePiece model"):
        sentencepiece_to_json(tmp_path / "tokenizer.model")
