"""Trees are values: quantized leaves never change after they are made, so threads may decode
with one tree at once. Each round quantizes afresh (no kernel copy built yet), starts two
threads together on the same tree, and compares each one's logits and greedy tokens with a
single thread's on an identical tree."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.quant import QuantRecipe, quantize
from pangu_fn.tree import flatten

ROUNDS = 2


def decode(tree: dict, cfg: pf.ModelConfig) -> tuple[torch.Tensor, list[list[int]]]:
    """(logits of a two-row prompt batch, 8 greedy tokens for each of two prompts)."""
    tokens = torch.randint(3, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, _ = pf.forward(tree, cfg, tokens)
    out = pf.generate(tree, cfg, [[1, 5, 9, 3], [7, 8, 40]], 8, eos_token_ids=())
    return logits, [c.tokens for c in out]


def run(start: threading.Barrier, tree: dict, cfg: pf.ModelConfig, results: list, i: int) -> None:
    start.wait()
    results[i] = decode(tree, cfg)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_two_threads_decoding_one_tree_match_one_thread(scheme):
    params, cfg = random_model("tiny-openpangu", hidden_size=256, intermediate_size=768, vocab_size=1024)
    recipe = QuantRecipe(scheme, group_size=32, head=scheme)
    before = {k: v.to_tensors() for k, v in flatten(quantize(params, recipe)).items() if hasattr(v, "to_tensors")}
    want_logits, want_tokens = decode(quantize(params, recipe), cfg)
    for _ in range(ROUNDS):
        tree = quantize(params, recipe)
        start, results = threading.Barrier(2, timeout=60), [None, None]
        threads = [threading.Thread(target=run, args=(start, tree, cfg, results, i)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        for logits, tokens in results:
            assert torch.equal(logits, want_logits) and tokens == want_tokens
        for name, leaf in flatten(tree).items():  # what the leaves hold (and would save) did not change
            if name in before:
                assert all(torch.equal(t, before[name][s]) for s, t in leaf.to_tensors().items())
