"""Seed `.pt` state dicts: wrapper dicts and prefixes, shuffled synonyms, [in, out] matrices and
fused q/k/v load to the same logits; missing, unmatched and ambiguous keys are all reported."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.errors import FormatError
from pangu_fn.tree import flatten

# synonyms written out here (not imported) so the test checks the matcher against its spec;
# True marks names whose matrices are stored [in, out] (GPT-2 Conv1D)
CONTAINERS = ["blocks", "layers", "h"]
NORM1 = ["ln_1", "ln1", "input_layernorm", "norm1", "attn_norm"]
NORM2 = ["ln_2", "post_attention_layernorm", "norm2", "mlp_norm"]
ATTN = ["attn", "attention", "self_attn"]
PROJ = {"q": [("q_proj", False), ("query", False), ("wq", False)],
        "k": [("k_proj", False), ("key", False), ("wk", False)],
        "v": [("v_proj", False), ("value", False), ("wv", False)],
        "o": [("o_proj", False), ("out_proj", False), ("c_proj", True), ("dense", False)]}
MLP = ["mlp", "ffn", "feed_forward"]
UP = [("c_fc", True), ("fc1", False), ("up_proj", False), ("dense_h_to_4h", False)]
DOWN = [("c_proj", True), ("fc2", False), ("down_proj", False)]
TOK = ["wte", "token_embedding", "embed_tokens", "tok_embeddings"]
POS = ["wpe", "position_embedding", "pos_embed"]
FINAL = ["ln_f", "norm", "final_layernorm"]


def seed_state_dict(params: dict, cfg: pf.ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Our tree renamed with a random synonym per tensor group, some blocks with fused qkv."""
    rng = random.Random(seed)
    flat = flatten(params)
    sd = {f"{rng.choice(TOK)}.weight": flat["tok_embed.weight"],
          f"{rng.choice(POS)}.weight": flat["pos_embed.weight"]}
    final = rng.choice(FINAL)
    sd[f"{final}.weight"], sd[f"{final}.bias"] = flat["final_norm.weight"], flat["final_norm.bias"]
    for i in range(cfg.num_layers):
        src, dst = f"blocks.{i}", f"{rng.choice(CONTAINERS)}.{i}"
        for names, ours in ((NORM1, "attn_norm"), (NORM2, "mlp_norm")):
            n = rng.choice(names)
            gamma = rng.random() < 0.3
            sd[f"{dst}.{n}.{'gamma' if gamma else 'weight'}"] = flat[f"{src}.{ours}.weight"]
            sd[f"{dst}.{n}.{'beta' if gamma else 'bias'}"] = flat[f"{src}.{ours}.bias"]
        attn = rng.choice(ATTN)
        fused = rng.choice([None, "c_attn", "in_proj"])
        if fused == "c_attn":  # GPT-2: [H, 3H]
            sd[f"{dst}.{attn}.c_attn.weight"] = torch.cat([flat[f"{src}.attn.{p}.weight"] for p in "qkv"]).t().contiguous()
            sd[f"{dst}.{attn}.c_attn.bias"] = torch.cat([flat[f"{src}.attn.{p}.bias"] for p in "qkv"])
        elif fused == "in_proj":  # nn.MultiheadAttention: [3H, H]
            sd[f"{dst}.{attn}.in_proj_weight"] = torch.cat([flat[f"{src}.attn.{p}.weight"] for p in "qkv"])
            sd[f"{dst}.{attn}.in_proj_bias"] = torch.cat([flat[f"{src}.attn.{p}.bias"] for p in "qkv"])
        for p, choices in PROJ.items():
            if fused and p != "o":
                continue
            n, conv = rng.choice(choices)
            w = flat[f"{src}.attn.{p}.weight"]
            sd[f"{dst}.{attn}.{n}.weight"] = w.t().contiguous() if conv else w
            sd[f"{dst}.{attn}.{n}.bias"] = flat[f"{src}.attn.{p}.bias"]
        mlp = rng.choice(MLP)
        for choices, ours in ((UP, "up"), (DOWN, "down")):
            n, conv = rng.choice(choices)
            w = flat[f"{src}.mlp.{ours}.weight"]
            sd[f"{dst}.{mlp}.{n}.weight"] = w.t().contiguous() if conv else w
            sd[f"{dst}.{mlp}.{n}.bias"] = flat[f"{src}.mlp.{ours}.bias"]
    if "lm_head.weight" in flat:
        sd["lm_head.weight"] = flat["lm_head.weight"]
    keys = list(sd)
    rng.shuffle(keys)
    return {f"module.{k}": sd[k] for k in keys}


def logits(params, cfg):
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    return pf.forward(params, cfg, ids)[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_seed_pt_with_prefixes_and_shuffled_synonyms_loads(tmp_path, seed):
    params, cfg = random_model("tiny-gpt", seed=seed, num_layers=3, tie_embeddings=seed % 2 == 0)
    sd = seed_state_dict(params, cfg, seed)
    if seed % 2 == 0:
        sd["module.lm_head.weight"] = params["tok_embed"]["weight"].clone()  # a tied head saved as a copy
    torch.save({"model_state_dict": sd, "epoch": 3, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               tmp_path / "seed.pt")
    loaded, c = pf.load(tmp_path / "seed.pt", config="tiny-gpt")
    assert c == cfg
    a, b = flatten(params), flatten(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(loaded, c), logits(params, cfg))


def test_missing_unmatched_and_ambiguous_keys(tmp_path):
    params, cfg = random_model("tiny-gpt", seed=4)
    sd = seed_state_dict(params, cfg, 4)
    down = next(k for k in sd if k.startswith("module.") and ".1." in k and k.endswith("bias")
                and any(f".{n}." in k for n, _ in DOWN))
    missing = {k: v for k, v in sd.items() if k != down}
    missing["module.blocks.0.attn.rel_pos.weight"] = torch.zeros(3)
    torch.save(missing, tmp_path / "m.pt")
    with pytest.raises(FormatError, match=r"missing tensors \['blocks.1.mlp.down.bias'\]; unmatched keys "
                                          r"\['module.blocks.0.attn.rel_pos.weight'\]"):
        pf.load(tmp_path / "m.pt", config="tiny-gpt")

    twice = dict(sd)
    tok = next(k for k in sd if any(k == f"module.{n}.weight" for n in TOK))
    other = next(f"module.{n}.weight" for n in TOK if f"module.{n}.weight" != tok)
    twice[other] = sd[tok]
    torch.save(twice, tmp_path / "t.pt")
    with pytest.raises(FormatError, match=r"both .* look like tok_embed.weight; refusing to guess"):
        pf.load(tmp_path / "t.pt", config="tiny-gpt")


def test_alpha_names_in_a_pt_file_and_heads_from_known_sizes(tmp_path):
    params, cfg = random_model("tiny-alpha", seed=1)
    flat = flatten(params)
    sd = {f"backbone.{k.replace('tok_embed', 'word_embedding').replace('query_embed', 'top_query_embedding')}": v
          for k, v in flat.items()}
    torch.save({"state_dict": sd}, tmp_path / "a.pt")
    loaded, c = pf.load(tmp_path / "a.pt", config=cfg)
    assert c == cfg and torch.equal(logits(loaded, c), logits(params, cfg))
    with pytest.raises(FormatError, match="number of attention heads cannot be read"):
        pf.load(tmp_path / "a.pt")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "l.pt")
    with pytest.raises(FormatError, match="expected a dict of tensors"):
        pf.load(tmp_path / "l.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(FormatError, match="junk.pt: "):
        pf.load(tmp_path / "junk.pt")
