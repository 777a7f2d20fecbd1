"""Structured pruning: smaller tensors that compute exactly what the dense model computes with
the removed heads / neurons zeroed; GQA groups; save/load and decoding with per-layer widths;
importance scores against independent computations; typed errors."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.errors import ConfigError
from pangu_fn.evaluate import next_token_loss
from pangu_fn.params import layer_sizes
from pangu_fn.prune import PruneRecipe, calibration_windows, count_for, input_norms, prune, unit_scores
from pangu_fn.prune.scope import block_prefixes, get
from pangu_fn.tree import map_with_names


def zeroed_dense(params: dict, cfg: pf.ModelConfig, removed: dict) -> dict:
    """The dense tree with the report's removed KV groups / query heads / neurons zeroed: their
    q/k/v rows, o columns, gate/up rows and down columns (biases included) set to 0."""
    d = cfg.head_dim

    def zero(name: str, t: torch.Tensor) -> torch.Tensor:
        prefix = next((p for p in removed if name.startswith(p + ".")), None)
        if prefix is None:
            return t
        r, t = removed[prefix], t.clone()
        q_idx = [h * d + i for h in r["heads"] for i in range(d)]
        kv_idx = [g * d + i for g in r["kv_heads"] for i in range(d)]
        for lin, idx in (("attn.q", q_idx), ("attn.k", kv_idx), ("attn.v", kv_idx),
                         ("mlp.gate", r["neurons"]), ("mlp.up", r["neurons"])):
            if name.startswith(f"{prefix}.{lin}."):
                t[idx] = 0
        if name == f"{prefix}.attn.o.weight":
            t[:, q_idx] = 0
        if name == f"{prefix}.mlp.down.weight":
            t[:, r["neurons"]] = 0
        return t

    return map_with_names(zero, params)


RECIPES = [
    PruneRecipe("structured", heads=0.5, ffn=0.5),
    PruneRecipe("structured", heads=0.5, ffn=0.3, allocation="global"),
    PruneRecipe("structured", heads=0.5, ffn=0.4, importance="activation", allocation="global",
                calib_samples=4, calib_seq_len=32),
    PruneRecipe("structured", heads=0.25, ffn=0.25, importance="taylor", calib_samples=4, calib_seq_len=32),
]


@pytest.mark.parametrize("recipe", RECIPES, ids=["magnitude", "magnitude-global", "activation-global", "taylor"])
def test_pruned_logits_equal_dense_with_units_zeroed(family_model, recipe):
    params, cfg = family_model
    calib = torch.randint(0, cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(1))
    out, report = prune(params, recipe, calib, cfg=cfg)
    removed = report.removed
    assert removed is not None and set(removed) == set(block_prefixes(params))
    for p in block_prefixes(params):
        before, after = layer_sizes(get(params, p), cfg), layer_sizes(get(out, p), cfg)
        r = removed[p]
        assert after.num_heads == before.num_heads - len(r["heads"]) == r["heads_after"]
        assert after.num_kv_heads == before.num_kv_heads - len(r["kv_heads"])
        assert after.intermediate_size == before.intermediate_size - len(r["neurons"]) == r["ffn_after"]
        group = before.num_heads // before.num_kv_heads
        assert r["heads"] == [h for g in r["kv_heads"] for h in range(g * group, (g + 1) * group)]
        if recipe.allocation == "layer":
            assert len(r["kv_heads"]) == count_for(recipe.heads, before.num_kv_heads)
            assert len(r["neurons"]) == count_for(recipe.ffn, before.intermediate_size)
    if recipe.allocation == "global":
        total_f = sum(r["ffn_before"] for r in removed.values())
        assert sum(len(r["neurons"]) for r in removed.values()) == count_for(recipe.ffn, total_f)
    assert report.parameters["after"] < report.parameters["before"]
    assert report.bytes["after"] < report.bytes["before"]
    pf.validate(out, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    ref, _ = pf.forward(zeroed_dense(params, cfg, removed), cfg, tokens)
    ours, _ = pf.forward(out, cfg, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_gqa_group_goes_with_its_query_heads():
    params, cfg = random_model("tiny-openpangu")  # 4 query heads, 2 KV heads, head_dim 16
    recipe = PruneRecipe("structured", remove_heads={0: (1,)}, remove_neurons={1: (0, 5, 127)})
    out, report = prune(params, recipe, cfg=cfg)
    assert report.removed["blocks.0"]["heads"] == [2, 3] and report.removed["blocks.0"]["kv_heads"] == [1]
    b0, b1 = out["blocks"][0], out["blocks"][1]
    assert b0["attn"]["q"]["weight"].shape == (32, 64) and b0["attn"]["k"]["weight"].shape == (16, 64)
    assert b0["attn"]["o"]["weight"].shape == (64, 32)
    torch.testing.assert_close(b0["attn"]["q"]["weight"], params["blocks"][0]["attn"]["q"]["weight"][:32])
    torch.testing.assert_close(b0["attn"]["k"]["bias"], params["blocks"][0]["attn"]["k"]["bias"][:16])
    assert b1["mlp"]["gate"]["weight"].shape == (125, 64) and b1["mlp"]["down"]["weight"].shape == (64, 125)
    assert b1["attn"]["q"]["weight"] is params["blocks"][1]["attn"]["q"]["weight"]  # untouched block shared
    assert report.removed["blocks.1"]["neurons"] == [0, 5, 127]


def test_different_widths_save_load_and_decode(tmp_path):
    params, cfg = random_model("tiny-openpangu", num_layers=3)
    recipe = PruneRecipe("structured", remove_heads={0: (0,), 2: (1,)}, remove_neurons={1: tuple(range(0, 128, 3))})
    out, _ = prune(params, recipe, cfg=cfg)
    widths = [layer_sizes(b, cfg) for b in out["blocks"]]
    assert [w.num_heads for w in widths] == [2, 4, 2] and [w.intermediate_size for w in widths] == [128, 85, 128]
    loaded, cfg2 = pf.load(pf.save(tmp_path / "pruned", out, cfg))
    assert [layer_sizes(b, cfg2) for b in loaded["blocks"]] == widths
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pf.forward(loaded, cfg2, tokens)[0], pf.forward(out, cfg, tokens)[0])
    # cached decoding with per-layer KV widths: greedy tokens equal step-by-step full forwards
    prompt = tokens[0, :5].tolist()
    (completion,) = pf.generate(loaded, cfg2, [prompt], max_new_tokens=6, eos_token_ids=())
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(pf.forward(loaded, cfg2, torch.tensor([seq]))[0][0, -1].argmax()))
    assert completion.tokens == seq[5:]


def test_taylor_importance_equals_autograd_first_order_change():
    """Taylor score of a unit = |sum over its parameters of w * dL/dw|, with the gradient taken
    here by plain autograd (loss.backward) instead of torch.func.grad."""
    params, cfg = random_model("tiny-gpt")
    calib = torch.randint(0, cfg.vocab_size, (500,), generator=torch.Generator().manual_seed(4))
    recipe = PruneRecipe("structured", importance="taylor", calib_samples=6, calib_seq_len=24, batch_size=4)
    scores = unit_scores(params, cfg, recipe, calib)
    tokens = calibration_windows(calib, 6, 24, 0)
    leaves = map_with_names(lambda n, t: t.detach().clone().requires_grad_(True), params)
    next_token_loss(leaves, cfg, tokens).backward()
    d = cfg.head_dim
    for i, blk in enumerate(leaves["blocks"]):
        wg = {k: (lin["weight"] * lin["weight"].grad, lin["bias"] * lin["bias"].grad)
              for k, lin in {**blk["attn"], **blk["mlp"]}.items()}
        for h in range(cfg.num_heads):  # MHA: every KV group is one head
            rows = slice(h * d, (h + 1) * d)
            s = sum(wg[k][0][rows].sum() + wg[k][1][rows].sum() for k in ("q", "k", "v")) + wg["o"][0][:, rows].sum()
            torch.testing.assert_close(scores[f"blocks.{i}"].heads[h].float(), s.abs().detach(), rtol=1e-4, atol=1e-7)
        direct = (wg["up"][0].sum(1) + wg["up"][1] + wg["down"][0].sum(0)).abs().detach()
        torch.testing.assert_close(scores[f"blocks.{i}"].neurons.float(), direct, rtol=1e-4, atol=1e-7)


def test_activation_importance_uses_head_and_neuron_output_norms():
    params, cfg = random_model("tiny-openpangu")
    calib = torch.randint(0, cfg.vocab_size, (500,), generator=torch.Generator().manual_seed(5))
    recipe = PruneRecipe("structured", importance="activation", calib_samples=4, calib_seq_len=32)
    scores = unit_scores(params, cfg, recipe, calib)
    tokens = calibration_windows(calib, 4, 32, 0)
    # direct: the down projection's input is act(gate(x)) * up(x) at mlp_norm(h); recompute block 0
    from pangu_fn.layers import activation, attention, norm
    from pangu_fn.model import _context
    blk = params["blocks"][0]
    x = torch.nn.functional.embedding(tokens, params["tok_embed"]["weight"])
    ctx = _context(cfg, tokens, None, torch.float32, False)
    h = x + attention(blk["attn"], cfg, norm(x, blk["attn_norm"], cfg), ctx, None)
    m = norm(h, blk["mlp_norm"], cfg)
    hidden = activation(m @ blk["mlp"]["gate"]["weight"].T, cfg) * (m @ blk["mlp"]["up"]["weight"].T)
    direct = hidden.reshape(-1, hidden.shape[-1]).norm(dim=0) * blk["mlp"]["down"]["weight"].norm(dim=0)
    torch.testing.assert_close(scores["blocks.0"].neurons.float(), direct, rtol=1e-4, atol=1e-6)
    norms = input_norms(params, cfg, ["blocks.0.attn.o.weight"], tokens)["blocks.0.attn.o.weight"]
    per_col = norms * blk["attn"]["o"]["weight"].norm(dim=0)
    torch.testing.assert_close(scores["blocks.0"].heads.float(), per_col.reshape(2, -1).sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe,match", [
    (PruneRecipe("structured", heads=0.9), "every"),  # round(0.9 * 2 KV groups) = 2 of 2
    (PruneRecipe("structured", remove_heads={1: (0, 1)}), "all 2 KV groups"),
    (PruneRecipe("structured", remove_heads={0: (2,)}), "cannot remove"),
    (PruneRecipe("structured", remove_neurons={5: (0,)}), "block 5 does not exist"),
    (PruneRecipe("structured", heads=0.9, allocation="global"), "leave a block without"),
])
def test_structured_bad_recipes(recipe, match):
    params, cfg = random_model("tiny-openpangu")
    with pytest.raises(ConfigError, match=match):
        prune(params, recipe, cfg=cfg)


def test_structured_needs_config():
    params, _ = random_model("tiny-gpt")
    with pytest.raises(ConfigError, match="cfg"):
        prune(params, PruneRecipe("structured", heads=0.5))


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_multiple_of_rounds_kept_ffn_widths(allocation):
    params, cfg = random_model("tiny-gpt", num_layers=3)  # FFN 256 per block
    recipe = PruneRecipe("structured", ffn=0.45, allocation=allocation, multiple_of=48)
    out, report = prune(params, recipe, cfg=cfg)
    widths = [layer_sizes(b, cfg).intermediate_size for b in out["blocks"]]
    assert all(w % 48 == 0 and 48 <= w <= 240 for w in widths)
    if allocation == "layer":
        assert widths == [144] * 3  # 256 - round(115.2) = 141 kept -> nearest multiple of 48
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    ref, _ = pf.forward(zeroed_dense(params, cfg, report.removed), cfg, tokens)
    torch.testing.assert_close(pf.forward(out, cfg, tokens)[0], ref, rtol=1e-5, atol=1e-5)
