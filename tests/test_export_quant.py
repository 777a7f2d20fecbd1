"""Quantized trees export through their custom ops: int8 -> DequantizeLinear + MatMul, int4 ->
com.microsoft MatMulNBits (ort) or standard-op dequantization (ascend), and the bundles
reproduce the PyTorch quantized path."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import random_model
from pangu_export import check_ascend, export_bundle, load_program
from pangu_runtime import Session
from test_export import shared_bundle, shared_dir  # noqa: F401  (shared_dir is a fixture)

import pangu_fn as pf
from pangu_fn import quant

PROMPTS = [[5, 17, 42, 9, 5, 17, 42, 9, 5], [3, 88], [100, 7, 7, 61, 200, 33]]
# int4 with zero points, the MLP down projections int8, the tied head / embedding int8
MIXED = {"scheme": "int4", "group_size": 32, "symmetric": False, "compute_dtype": "fp32",
         "overrides": (("*.down", "int8"),), "head": "int8"}
# symmetric int4 everywhere, the tied head / embedding int4 too
SYMMETRIC = {"scheme": "int4", "group_size": 32, "symmetric": True, "compute_dtype": "fp32", "head": "int4"}
RECIPES = {"mixed": MIXED, "symmetric": SYMMETRIC}


def quantized(recipe: dict):
    params, cfg = random_model("tiny-openpangu")
    return quant.quantize(params, quant.QuantRecipe(**recipe)), cfg


def ort_quant_bundle(shared_dir, name: str) -> Path:  # noqa: F811
    """The ort bundle of MIXED or SYMMETRIC, exported once per run (shared with the genai tests)."""
    params, cfg = quantized(RECIPES[name])
    return shared_bundle(shared_dir, f"ort-quant-{name}", lambda p: export_bundle(params, cfg, p, "ort", progress=False))


def ops(path) -> collections.Counter:
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.graph.node)


def assert_matches_torch(session: Session, params, cfg, steps: int = 32) -> None:
    with torch.no_grad():
        for prompt, got in zip(PROMPTS, session.logits(PROMPTS)):
            ref, _ = pf.forward(params, cfg, torch.tensor([prompt]))
            ref = ref[0].numpy()
            assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    want = pf.generate(params, cfg, PROMPTS, steps, eos_token_ids=())
    got = session.generate(PROMPTS, steps, eos_token_ids=())
    assert [c.tokens for c in got] == [c.tokens for c in want]


@pytest.mark.parametrize("name", ["mixed", "symmetric"])
def test_ort_quantized_bundle_matches_pytorch(shared_dir, name):  # noqa: F811
    recipe = RECIPES[name]
    params, cfg = quantized(recipe)
    path = ort_quant_bundle(shared_dir, name)
    m = json.loads((path / "manifest.json").read_text())
    counts = ops(path)
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    widths = [a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "N"]
    int4 = [leaf.shape[0] for leaf in pf.tree.flatten(params).values() if getattr(leaf, "kind", None) == "int4"]
    assert sum(widths) == sum(int4)  # every int4 output row once (q/k/v and gate/up are merged into one node)
    if name == "mixed":
        assert counts["DequantizeLinear"] >= cfg.num_layers and m["quantization"]["leaves"]["int8"]["count"] >= 3
    assert m["quantization"]["lowering"]["int4"] == "com.microsoft MatMulNBits"
    assert_matches_torch(Session(path), params, cfg)


def test_int8_activations_are_close_not_equal(shared_dir, tmp_path):  # noqa: F811
    """accuracy_level 4 (int8 activations, the fast CPU path) changes the arithmetic: close to
    the PyTorch path, not equal. The runtime sets it for ONNX Runtime's fused int8 matmuls
    from the manifest (the exported int4 nodes carry it as an attribute)."""
    params, cfg = quantized(MIXED)
    shutil.copytree(ort_quant_bundle(shared_dir, "mixed"), tmp_path / "q")
    with torch.no_grad():
        ref, _ = pf.forward(params, cfg, torch.tensor([PROMPTS[0]]))
    ref = ref[0].numpy().ravel()
    exact = Session(tmp_path / "q").logits(PROMPTS[:1])[0].ravel()
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    manifest["model"]["accuracy_level"] = 4
    (tmp_path / "q" / "manifest.json").write_text(json.dumps(manifest))
    fast = Session(tmp_path / "q").logits(PROMPTS[:1])[0].ravel()
    assert np.abs(exact - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    assert np.corrcoef(ref, fast)[0, 1] > 0.99 and np.abs(ref - fast).max() > 1e-3


def test_ascend_quantized_bundle(tmp_path):
    params, cfg = quantized(MIXED)
    m = export_bundle(params, cfg, tmp_path / "a", "ascend", batch_size=3, kv_len=64, progress=False)
    assert check_ascend(tmp_path / "a" / "model.onnx") == []
    counts = ops(tmp_path / "a")
    assert not any(k.startswith("com.microsoft") for k in counts) and counts["DequantizeLinear"] > 0
    assert m["quantization"]["lowering"]["int4"].startswith("dequantize")
    assert_matches_torch(Session(tmp_path / "a"), params, cfg, steps=16)


def test_pt2_quantized_program(tmp_path):
    params, cfg = quantized(SYMMETRIC)
    export_bundle(params, cfg, tmp_path / "t", "torch", progress=False)
    program = load_program(tmp_path / "t")
    tokens = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, _ = program(tokens, program.new_cache(1, 16))
        b, _ = pf.forward(params, cfg, tokens, pf.init_cache(params, cfg, 1, 16))
    assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max())
