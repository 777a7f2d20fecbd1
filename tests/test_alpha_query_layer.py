"""PanGu-α against a direct computation written here from the published equations
(MindSpore pangu_alpha.py; the Hugging Face gpt_pangu port agrees): pre-LN blocks, final LN,
then the top query layer whose queries come from the raw top-query embedding of each
position, whose keys and values come from LN1 of the final-LN output, and whose residual
adds to that output; logits use the tied word embedding."""

from __future__ import annotations

import math

import torch
from helpers import random_model

import pangu_fn as pf


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def dense(x, p):
    return x @ p["weight"].T + p["bias"]


def reference_block(p, x, heads, eps, query_source=None):
    T, d = x.shape[0], x.shape[1] // heads
    h = layer_norm(x, p["attn_norm"]["weight"], p["attn_norm"]["bias"], eps)
    q = dense(h if query_source is None else query_source, p["attn"]["q"])
    k, v = dense(h, p["attn"]["k"]), dense(h, p["attn"]["v"])
    split = lambda t: t.view(T, heads, d).transpose(0, 1)
    scores = split(q) @ split(k).transpose(1, 2) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    attn = (scores.softmax(-1) @ split(v)).transpose(0, 1).reshape(T, -1)
    x = x + dense(attn, p["attn"]["o"])
    h = layer_norm(x, p["mlp_norm"]["weight"], p["mlp_norm"]["bias"], eps)
    return x + dense(gelu_tanh(dense(h, p["mlp"]["up"])), p["mlp"]["down"])


def reference_logits(params, cfg, tokens):
    pos = torch.arange(len(tokens))
    x = params["tok_embed"]["weight"][tokens] + params["pos_embed"]["weight"][pos]
    for blk in params["blocks"]:
        x = reference_block(blk, x, cfg.num_heads, cfg.norm_eps)
    x = layer_norm(x, params["final_norm"]["weight"], params["final_norm"]["bias"], cfg.norm_eps)
    query = params["query_embed"]["weight"][pos]
    x = reference_block(params["query_layer"], x, cfg.num_heads, cfg.norm_eps, query_source=query)
    return x @ params["tok_embed"]["weight"].T


def test_query_layer_matches_direct_computation():
    params, cfg = random_model("tiny-alpha", seed=4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ours, _ = pf.forward(params, cfg, tokens)
    for row in range(2):
        ref = reference_logits(params, cfg, tokens[row])
        assert (ours[row] - ref).abs().max().item() < 1e-4


def test_query_layer_is_load_bearing():
    """Changing only the top-query embedding changes the logits (it is really used)."""
    params, cfg = random_model("tiny-alpha", seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    base, _ = pf.forward(params, cfg, tokens)
    other = dict(params, query_embed={"weight": params["query_embed"]["weight"].flip(0)})
    changed, _ = pf.forward(other, cfg, tokens)
    assert (base - changed).abs().max().item() > 1e-3
