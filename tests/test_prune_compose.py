"""Pruned trees compose with the other transforms and consumers: quantize (int8 / int4), save
and load of quantized pruned trees, speculative decoding (pruned target, pruned draft), and
export to an ONNX bundle run by pangu_runtime, with layers of different widths."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.errors import ConfigError
from pangu_fn.params import layer_sizes
from pangu_fn.prune import PruneRecipe, prune
from pangu_fn.prune.scope import get, scope_names
from pangu_fn.speculative import speculative_generate

# different widths per layer: block 0 loses a KV group (2 query heads), block 2 the other one,
# block 1 keeps its heads and loses a third of its FFN neurons
UNEVEN = PruneRecipe("structured", remove_heads={0: (0,), 2: (1,)}, remove_neurons={1: tuple(range(0, 128, 3))})


def uneven_model() -> tuple[dict, pf.ModelConfig]:
    params, cfg = random_model("tiny-openpangu", num_layers=3)
    out, _ = prune(params, UNEVEN, cfg=cfg)
    assert [layer_sizes(b, cfg).num_heads for b in out["blocks"]] == [2, 4, 2]
    assert [layer_sizes(b, cfg).intermediate_size for b in out["blocks"]] == [128, 85, 128]
    return out, cfg


def test_pruned_then_int8_keeps_zeros_and_saves(tmp_path):
    params, cfg = random_model("tiny-openpangu")
    pruned, _ = prune(params, PruneRecipe("n:m", n=2, m=4))
    q = pf.quantize(pruned, pf.QuantRecipe("int8", compute_dtype="fp32", prepack=False))
    for name in scope_names(pruned, ("blocks",)):
        w, leaf = get(pruned, name), get(q, name)
        assert (leaf.dequantize()[w == 0] == 0).all(), name  # int8 symmetric: 0 -> 0 exactly
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = pf.forward(pruned, cfg, tokens)[0]
    got = pf.forward(q, cfg, tokens)[0]
    assert torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1] > 0.999
    loaded, cfg2 = pf.load(pf.save(tmp_path / "q", q, cfg))
    torch.testing.assert_close(pf.forward(loaded, cfg2, tokens)[0], got)


def test_structured_then_int4_needs_group_multiples():
    params, cfg = random_model("tiny-openpangu")
    odd, _ = prune(params, PruneRecipe("structured", ffn=0.3), cfg=cfg)  # 128 -> 90 neurons
    with pytest.raises(ConfigError):
        pf.quantize(odd, pf.QuantRecipe("int4", group_size=32))
    even, _ = prune(params, PruneRecipe("structured", heads=0.5, ffn=0.3, multiple_of=32), cfg=cfg)
    assert [layer_sizes(b, cfg).intermediate_size for b in even["blocks"]] == [96, 96]  # 89.6 -> 96
    q = pf.quantize(even, pf.QuantRecipe("int4", group_size=32, compute_dtype="fp32", prepack=False))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, got = pf.forward(even, cfg, tokens)[0], pf.forward(q, cfg, tokens)[0]
    assert torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1] > 0.99


def test_speculative_decoding_with_pruned_target_and_pruned_draft():
    target, cfg = uneven_model()
    prompts = [[5, 17, 42, 9, 5, 17], [3, 88, 61]]
    plain = pf.generate(target, cfg, prompts, max_new_tokens=10, eos_token_ids=())
    spec = speculative_generate(target, cfg, prompts, 10, eos_token_ids=(), drafter="self", k=3)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    # a pruned copy as the draft model of the dense target: output is still the target's
    dense, dcfg = random_model("tiny-openpangu", num_layers=3)
    draft, _ = prune(dense, PruneRecipe("structured", heads=0.5, ffn=0.5), cfg=dcfg)
    plain = pf.generate(dense, dcfg, prompts, max_new_tokens=10, eos_token_ids=())
    spec = speculative_generate(dense, dcfg, prompts, 10, eos_token_ids=(), drafter=(draft, dcfg), k=3)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]


def test_export_of_uneven_widths_matches_in_onnx_runtime(tmp_path):
    from pangu_export import export_bundle
    from pangu_runtime import Session

    params, cfg = uneven_model()
    manifest = export_bundle(params, cfg, tmp_path / "bundle", "ort", genai=False, progress=False)
    assert manifest["cache"]["kv_heads"] == [1, 2, 1]
    session = Session(tmp_path / "bundle")
    prompts = [[5, 17, 42, 9, 5, 17, 42], [3, 88, 61]]
    for prompt, got in zip(prompts, session.logits(prompts)):
        ref = pf.forward(params, cfg, torch.tensor([prompt]))[0][0].numpy()
        assert abs(got - ref).max() < 1e-4
    ours = pf.generate(params, cfg, prompts, max_new_tokens=8, eos_token_ids=())
    theirs = session.generate(prompts, max_new_tokens=8, eos_token_ids=())
    assert [c.tokens for c in theirs] == [c.tokens for c in ours]
