"""Parameter trees: nested dicts and lists whose leaves are tensors or quantized-tensor objects.

Traversal is torch's pytree (`torch.utils._pytree`, which `cache.py` registers KVCache with):
map a tree with `pytree.tree_map(fn, tree)`. This module adds what pytree does not give:
dotted names for leaves (`blocks.3.attn.q.weight`; integer parts are list indices) and back,
and parameter / byte counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree

Tree = Any


def dotted_name(path: tuple[pytree.KeyEntry, ...]) -> str:
    """A pytree key path as a dotted name: dict keys, list indices and attribute names joined by '.'."""
    parts = []
    for key in path:
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, pytree.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def leaves_with_names(tree: Tree) -> list[tuple[str, Any]]:
    """`(dotted_name, leaf)` pairs in pytree order (dict insertion order, list order)."""
    return [(dotted_name(path), leaf) for path, leaf in pytree.tree_flatten_with_path(tree)[0]]


def flatten(tree: Tree) -> dict[str, Any]:
    """Tree -> `{dotted_name: leaf}`."""
    return dict(leaves_with_names(tree))


def unflatten(flat: dict[str, Any]) -> Tree:
    """`{dotted_name: leaf}` -> tree. A level whose keys are exactly 0..n-1 becomes a list."""
    root: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = root
        *parents, last = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: listify(v) for k, v in node.items()}
        if out and all(k.isdigit() for k in out) and sorted(map(int, out)) == list(range(len(out))):
            return [out[str(i)] for i in range(len(out))]
        return out

    return listify(root)


def map_with_names(fn: Callable[[str, Any], Any], tree: Tree) -> Tree:
    """Apply `fn(dotted_name, leaf)` to every leaf; returns a new tree (the input is untouched)."""
    return pytree.tree_map_with_path(lambda path, leaf: fn(dotted_name(path), leaf), tree)


def leaf_numel(leaf: Any) -> int:
    """Logical element count (a quantized leaf counts the weights it stands for)."""
    return int(leaf.numel())


def leaf_nbytes(leaf: Any) -> int:
    """Bytes of storage the leaf holds (packed data, scales and zero points for quantized leaves)."""
    if isinstance(leaf, torch.Tensor):
        return leaf.numel() * leaf.element_size()
    return int(leaf.nbytes)


def count_params(tree: Tree) -> int:
    """Logical parameter count. A tied LM head is counted once (it is not a leaf)."""
    return sum(leaf_numel(x) for x in pytree.tree_leaves(tree))


def nbytes(tree: Tree) -> int:
    """Storage bytes of all leaves."""
    return sum(leaf_nbytes(x) for x in pytree.tree_leaves(tree))


def bytes_by_dtype(tree: Tree) -> dict[str, int]:
    """Storage bytes grouped by dtype name (quantized leaves report their scheme name)."""
    out: dict[str, int] = {}
    for leaf in pytree.tree_leaves(tree):
        key = str(leaf.dtype).replace("torch.", "") if isinstance(leaf, torch.Tensor) else leaf.scheme
        out[key] = out.get(key, 0) + leaf_nbytes(leaf)
    return out
