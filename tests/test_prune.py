"""Unstructured and N:M pruning: exact counts for every granularity and scope (also past 2^24
elements), Wanda scores against transformers' own activations, typed errors for bad recipes."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import random_model, redraw_hf

import pangu_fn as pf
from pangu_fn.errors import ConfigError, ShapeError
from pangu_fn.io.hf import config_from_hf, hf_to_flat
from pangu_fn.prune import (
    PruneRecipe,
    calibration_windows,
    count_for,
    input_norms,
    prune,
    smallest_k_masks,
    wanda_scores,
)
from pangu_fn.prune.scope import get, scope_names
from pangu_fn.prune.select import sort_keys
from pangu_fn.tree import flatten, unflatten

SCOPES = [("blocks",), ("blocks", "head"), ("embeddings",)]


def calib_for(cfg: pf.ModelConfig, n: int = 600) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(7))


def assert_lowest_selected(scores: torch.Tensor, pruned: torch.Tensor) -> None:
    """Every pruned score is <= every kept score (within one comparison group)."""
    if pruned.any() and (~pruned).any():
        assert scores[pruned].max() <= scores[~pruned].min()


@pytest.mark.parametrize("scope", SCOPES, ids=["blocks", "blocks+head", "embeddings"])
@pytest.mark.parametrize("granularity", ["layer", "global", "row"])
def test_magnitude_exact_sparsity(family_model, granularity, scope):
    params, _cfg = family_model
    recipe = PruneRecipe("magnitude", sparsity=0.37, granularity=granularity, tensors=scope)
    out, report = prune(params, recipe)
    names = scope_names(params, scope)
    assert [t["name"] for t in report.tensors] == names
    if granularity == "global":
        total = sum(get(out, n).numel() for n in names)
        zeros = sum(int((get(out, n) == 0).sum()) for n in names)
        assert zeros == count_for(0.37, total) == report.scope["zeros"]
        flat_scores = torch.cat([get(params, n).abs().reshape(-1) for n in names])
        flat_pruned = torch.cat([(get(out, n) == 0).reshape(-1) for n in names])
        assert_lowest_selected(flat_scores, flat_pruned)
    for n in names:
        w, pruned = get(params, n), get(out, n) == 0
        if granularity == "layer":
            assert int(pruned.sum()) == count_for(0.37, w.numel())
            assert_lowest_selected(w.abs(), pruned)
        elif granularity == "row":
            assert (pruned.sum(1) == count_for(0.37, w.shape[1])).all()
            for r in range(0, w.shape[0], 7):
                assert_lowest_selected(w[r].abs(), pruned[r])
        kept = ~pruned
        assert torch.equal(get(out, n)[kept], w[kept])
    untouched = set(flatten(params)) - set(names)
    for n in untouched:
        assert get(out, n) is get(params, n)
    assert report.groups["norms"]["zeros"] == 0


def test_prune_never_mutates_its_input():
    params, cfg = random_model("tiny-openpangu")
    before = copy.deepcopy(params)
    for recipe in [PruneRecipe("magnitude", 0.5, tensors=("blocks", "head")), PruneRecipe("n:m", n=2, m=4),
                   PruneRecipe("structured", heads=0.5, ffn=0.5),
                   PruneRecipe("iterative", 0.5, rounds=2, recovery_steps=2, batch_size=2, seq_len=16)]:
        prune(params, recipe, calib_for(cfg), cfg=cfg)
    for name, t in flatten(before).items():
        assert torch.equal(get(params, name), t), name


def test_exact_selection_beyond_2_pow_24_elements():
    n = 4097 * 4097  # 16,785,409 > 2^24 = 16,777,216 (torch.quantile's limit)
    assert n > 2**24
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(4097, 4097, generator=gen) * 8).round() / 8  # few distinct values: many ties
    w[:3] = 0  # some weights already zero
    for frac in (0.5, 0.77):
        k = count_for(frac, n)
        keys = sort_keys(w.abs(), w)
        (mask,) = smallest_k_masks([keys], k)
        assert int(mask.sum()) == k
        threshold = torch.kthvalue(w.abs().reshape(-1), k).values  # the k-th smallest |w|
        assert w.abs()[mask].max() == threshold
        assert w.abs()[~mask].min() >= threshold
        assert mask[:3].all()  # already-zero weights are selected first


def test_big_lm_head_and_global_scope_exact():
    cfg = pf.ModelConfig.preset("tiny-gpt").replace(vocab_size=262160, tie_embeddings=False)
    params = pf.init_params(cfg, seed=1)
    assert params["lm_head"]["weight"].numel() > 2**24
    out, report = prune(params, PruneRecipe("magnitude", 0.5, tensors=("head",)))
    assert int((out["lm_head"]["weight"] == 0).sum()) == count_for(0.5, params["lm_head"]["weight"].numel())
    out, report = prune(params, PruneRecipe("magnitude", 0.3, granularity="global", tensors=("blocks", "head")))
    total = report.scope["numel"]
    assert report.scope["zeros"] == count_for(0.3, total)
    embeddings = [out[k]["weight"] for k in ("tok_embed", "pos_embed", "lm_head")]
    assert report.groups["embeddings"]["zeros"] == sum(int((t == 0).sum()) for t in embeddings)
    assert out["tok_embed"]["weight"] is params["tok_embed"]["weight"]  # not in scope: untouched


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_n_of_m_exactly_n_zeros_per_m(n, m, score):
    params, cfg = random_model("tiny-openpangu")
    recipe = PruneRecipe("n:m", n=n, m=m, score=score, calib_samples=4, calib_seq_len=32)
    out, report = prune(params, recipe, calib_for(cfg), cfg=cfg)
    norms = input_norms(params, cfg, scope_names(params, ("blocks",)), calibration_windows(calib_for(cfg), 4, 32, 0))
    for name in scope_names(params, ("blocks",)):
        w, o = get(params, name), get(out, name)
        groups = (o == 0).reshape(w.shape[0], -1, m)
        assert (groups.sum(-1) == n).all(), name
        s = (wanda_scores(w, norms[name]) if score == "wanda" else w.abs()).reshape(w.shape[0], -1, m)
        pruned_max = torch.where(groups, s, -torch.inf).amax(-1)
        kept_min = torch.where(~groups, s, torch.inf).amin(-1)
        assert (pruned_max <= kept_min).all()
    assert report.scope["sparsity"] == n / m


def test_n_of_m_needs_divisible_inputs():
    params, _cfg = random_model("tiny-openpangu")
    with pytest.raises(ShapeError, match="multiple of m=48"):
        prune(params, PruneRecipe("n:m", n=2, m=48))


def _hf_llama() -> tuple[transformers.LlamaForCausalLM, dict, pf.ModelConfig]:
    torch.manual_seed(3)
    hf_cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attention_bias=True, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    redraw_hf(model, 3)
    cfg = config_from_hf(model.config.to_dict())
    sd = model.state_dict()
    return model, unflatten(hf_to_flat(sd.__getitem__, list(sd), cfg)), cfg


HF_NAMES = {"self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k", "self_attn.v_proj": "attn.v",
            "self_attn.o_proj": "attn.o", "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up",
            "mlp.down_proj": "mlp.down"}


def test_wanda_scores_equal_direct_computation_from_transformers_activations():
    """||X_j|| is collected by our forward; the reference collects every linear's input inside
    transformers' LlamaForCausalLM with forward pre-hooks, then computes |W| * ||X_j|| itself."""
    model, params, cfg = _hf_llama()
    tokens = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sq[name] = sq.get(name, 0) + x.pow(2).sum(0)
        return record

    handles = []
    for i, layer in enumerate(model.model.layers):
        for hf_name, ours in HF_NAMES.items():
            mod = layer.get_submodule(hf_name)
            handles.append(mod.register_forward_pre_hook(hook(f"blocks.{i}.{ours}.weight")))
    handles.append(model.lm_head.register_forward_pre_hook(hook("lm_head.weight")))
    with torch.no_grad():
        for row in tokens.split(2):
            model(row)
    for h in handles:
        h.remove()
    names = scope_names(params, ("blocks", "head"))
    norms = input_norms(params, cfg, names, tokens, batch_size=2)
    for name in names:
        w = get(params, name)
        direct = w.abs().double() * sq[name].sqrt()[None, :]
        torch.testing.assert_close(wanda_scores(w, norms[name]).double(), direct, rtol=1e-4, atol=1e-6)
    out, _ = prune(params, PruneRecipe("wanda", 0.5, granularity="row", tensors=("blocks", "head")), tokens, cfg=cfg)
    for name in names:  # per output row: exactly half, and the lowest direct scores
        w, pruned = get(params, name), get(out, name) == 0
        direct = w.abs().double() * sq[name].sqrt()[None, :]
        assert (pruned.sum(1) == w.shape[1] // 2).all()
        highest_pruned = torch.where(pruned, direct, -torch.inf).amax(1)
        assert (highest_pruned <= torch.where(~pruned, direct, torch.inf).amin(1)).all()


def test_wanda_needs_calibration_and_config():
    params, cfg = random_model("tiny-gpt")
    with pytest.raises(ConfigError, match="calibration"):
        prune(params, PruneRecipe("wanda", 0.5), cfg=cfg)
    with pytest.raises(ConfigError, match="cfg"):
        prune(params, PruneRecipe("wanda", 0.5), calib_for(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": float("nan")}, "sparsity"),
    ({"method": "n:m", "n": 4, "m": 4}, "n < m"), ({"method": "n:m", "n": 5, "m": 4}, "n < m"),
    ({"heads": 1.0}, "heads"), ({"method": "bogus"}, "method"), ({"tensors": ("lm",)}, "tensors"),
    ({"granularity": "block"}, "granularity"), ({"rounds": 0}, "rounds"),
])
def test_bad_recipes_raise_config_errors(changes, match):
    with pytest.raises(ConfigError, match=match):
        PruneRecipe(**changes)


def test_quantized_leaves_are_refused():
    params, _cfg = random_model("tiny-gpt")

    class FakeQuant:  # a quantized leaf stand-in: not a tensor
        shape = torch.Size([64, 64])

    params = copy.copy(params)
    params["blocks"] = [dict(params["blocks"][0], attn={**params["blocks"][0]["attn"], "q": {"weight": FakeQuant()}}),
                        params["blocks"][1]]
    with pytest.raises(ConfigError, match="prune before quantizing"):
        prune(params, PruneRecipe("magnitude", 0.5))


def test_pruned_tree_saves_and_loads(tmp_path):
    params, cfg = random_model("tiny-alpha")
    out, _ = prune(params, PruneRecipe("magnitude", 0.6, granularity="global"))
    loaded, _cfg2 = pf.load(pf.save(tmp_path / "m", out, cfg))
    for name, t in flatten(out).items():
        assert torch.equal(get(loaded, name), t), name


def test_wanda_on_an_untied_input_embedding_is_refused():
    params, cfg = random_model("tiny-gpt", tie_embeddings=False)
    with pytest.raises(ConfigError, match="not used as a linear"):
        prune(params, PruneRecipe("wanda", 0.5, tensors=("embeddings",), calib_samples=2, calib_seq_len=16),
              calib_for(cfg), cfg=cfg)
    out, _ = prune(params, PruneRecipe("wanda", 0.5, tensors=("head",), calib_samples=2, calib_seq_len=16),
                   calib_for(cfg), cfg=cfg)
    assert int((out["lm_head"]["weight"] == 0).sum()) == count_for(0.5, out["lm_head"]["weight"].numel())
