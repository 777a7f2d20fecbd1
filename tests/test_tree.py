"""The dotted-name helpers of `pangu_fn.tree` walk trees exactly as torch's pytree does (one
traversal for the whole library): same leaves in the same order, names that `unflatten` turns
back into the tree, registered nodes such as KVCache entered, not taken as leaves."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

import pangu_fn as pf
from pangu_fn.tree import flatten, leaves_with_names, map_with_names, unflatten

KEYS = st.text("abcdefgh_", min_size=1, max_size=4)
LEAVES = st.integers(0, 3).map(lambda n: torch.arange(float(n)))
TREES = st.recursive(LEAVES, lambda sub: st.one_of(st.lists(sub, min_size=1, max_size=3),
                                                   st.dictionaries(KEYS, sub, min_size=1, max_size=3)), max_leaves=12)
ROOTS = st.dictionaries(KEYS, TREES, min_size=1, max_size=3)  # a parameter tree is a dict


def same_tree(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_tree, a, b))
    return a is b


@settings(max_examples=60, deadline=None)
@given(ROOTS)
def test_names_follow_pytree_and_unflatten_inverts_them(tree):
    named = leaves_with_names(tree)
    assert all(a is b for (_, a), b in zip(named, pytree.tree_leaves(tree), strict=True))
    assert len({n for n, _ in named}) == len(named)
    assert same_tree(unflatten(flatten(tree)), tree)
    renamed = map_with_names(lambda name, leaf: name, tree)
    assert pytree.tree_structure(renamed) == pytree.tree_structure(tree)
    assert pytree.tree_leaves(renamed) == [n for n, _ in named]


def test_names_of_a_model_tree_and_of_a_cache_inside_a_tree():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    params = pf.init_params(cfg, seed=0)
    names = list(flatten(params))
    assert "blocks.1.attn.q.weight" in names and names[0] == "tok_embed.weight"
    assert sum(leaf.numel() for leaf in pytree.tree_leaves(params)) == pf.count_params(params)

    cache = pf.init_cache(params, cfg, batch_size=2, max_len=8)
    state = {"cache": cache, "step": (torch.tensor(3),)}
    flat = flatten(state)
    assert list(flat) == ["cache.keys.0", "cache.keys.1", "cache.values.0", "cache.values.1", "cache.lengths",
                          "step.0"]
    assert flat["cache.values.1"] is cache.values[1]
    moved = map_with_names(lambda name, leaf: leaf + 1 if name == "cache.lengths" else leaf, state)
    assert isinstance(moved["cache"], pf.KVCache) and isinstance(moved["step"], tuple)
    assert moved["cache"].lengths.tolist() == [1, 1] and cache.lengths.tolist() == [0, 0]
