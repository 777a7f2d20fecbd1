"""Pytree helpers for parameter trees: nested dicts and lists whose leaves are tensors or
quantized-tensor objects (anything that is not a dict or list is a leaf).

Dotted names address leaves: `blocks.3.attn.q.weight`. Integer path parts are list indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

Tree = Any


def leaves_with_names(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield `(dotted_name, leaf)` in a stable order (dict insertion order, list order)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        yield prefix, tree
        return
    for key, value in items:
        yield from leaves_with_names(value, f"{prefix}.{key}" if prefix else str(key))


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


def tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """Apply `fn` to every leaf; returns a new tree (the input is untouched)."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [tree_map(fn, v) for v in tree]
    return fn(tree)


def map_with_names(fn: Callable[[str, Any], Any], tree: Tree, prefix: str = "") -> Tree:
    """Apply `fn(dotted_name, leaf)` to every leaf; returns a new tree."""
    if isinstance(tree, dict):
        return {k: map_with_names(fn, v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [map_with_names(fn, v, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(tree)]
    return fn(prefix, tree)


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
    return sum(leaf_numel(x) for _, x in leaves_with_names(tree))


def nbytes(tree: Tree) -> int:
    """Storage bytes of all leaves."""
    return sum(leaf_nbytes(x) for _, x in leaves_with_names(tree))


def bytes_by_dtype(tree: Tree) -> dict[str, int]:
    """Storage bytes grouped by dtype name (quantized leaves report their scheme name)."""
    out: dict[str, int] = {}
    for _, leaf in leaves_with_names(tree):
        key = str(leaf.dtype).replace("torch.", "") if isinstance(leaf, torch.Tensor) else leaf.scheme
        out[key] = out.get(key, 0) + leaf_nbytes(leaf)
    return out
