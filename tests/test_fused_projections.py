"""`fuse_projections`: q, k, v (and SwiGLU's gate, up) as one product each compute the same
function as the unfused tree, with and without a cache, and leave what they cannot fuse."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.params import fuse_projections, layer_sizes


def test_fused_tree_scores_and_decodes_like_the_original(family_model):
    params, cfg = family_model
    fused = fuse_projections(params, cfg)
    assert "q" in params["blocks"][0]["attn"]  # the input is untouched
    assert set(fused["blocks"][0]["attn"]) == {"qkv", "o"}
    assert ("gate_up" in fused["blocks"][0]["mlp"]) == (cfg.mlp == "swiglu")
    if cfg.query_layer:  # its queries come from the query embedding: left as it is
        assert set(fused["query_layer"]["attn"]) == {"q", "k", "v", "o"}
    assert [layer_sizes(b, cfg) for b in fused["blocks"]] == [layer_sizes(b, cfg) for b in params["blocks"]]
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pf.forward(fused, cfg, tokens)[0], pf.forward(params, cfg, tokens)[0],
                               atol=1e-5, rtol=1e-5)
    prompts = [tokens[0, :5].tolist(), tokens[1].tolist()]
    assert pf.generate(fused, cfg, prompts, 6) == pf.generate(params, cfg, prompts, 6)


def test_a_block_with_pruned_query_heads_stays_unfused():
    params, cfg = random_model("tiny-gpt")
    d, keep = cfg.head_dim, (cfg.num_heads - 1) * cfg.head_dim  # drop the last head of block 0
    attn = dict(params["blocks"][0]["attn"])
    for name in ("q", "k", "v"):
        attn[name] = {key: value[:keep] for key, value in attn[name].items()}
    attn["o"] = {"weight": attn["o"]["weight"][:, :keep], "bias": attn["o"]["bias"]}
    params["blocks"][0] = {**params["blocks"][0], "attn": attn}
    fused = fuse_projections(params, cfg)
    assert set(fused["blocks"][0]["attn"]) == {"q", "k", "v", "o"} and "qkv" in fused["blocks"][1]["attn"]
    assert layer_sizes(fused["blocks"][0], cfg).num_heads == keep // d
    tokens = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pf.forward(fused, cfg, tokens)[0], pf.forward(params, cfg, tokens)[0],
                               atol=1e-5, rtol=1e-5)


def test_fusing_a_quantized_tree_is_a_config_error():
    params, cfg = random_model("tiny-openpangu")
    with pytest.raises(pf.ConfigError, match="fuse before quantizing"):
        fuse_projections(pf.quantize(params, "int8"), cfg)
