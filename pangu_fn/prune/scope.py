"""Which tensors a recipe prunes, and the block layout structured pruning works on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from ..params import Params
from ..tree import leaves_with_names

LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def block_prefixes(params: Params) -> list[str]:
    """Dotted prefixes of every block: `blocks.0` ... and `query_layer` (PanGu-α). Block index
    i in recipes and reports is the position in this list (the query layer comes last)."""
    return [f"blocks.{i}" for i in range(len(params["blocks"]))] + (["query_layer"] if "query_layer" in params else [])


def get(params: Params, name: str) -> Any:
    """The leaf (or subtree) at a dotted name."""
    node: Any = params
    for part in name.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def scope_names(params: Params, tensors: Sequence[str]) -> list[str]:
    """Dotted names of the weights in scope: every linear weight of the blocks ("blocks"), the
    token embedding ("embeddings"), the LM head ("head": `lm_head.weight`, or the token
    embedding when tied). Raises ConfigError for a quantized leaf (prune before quantizing)."""
    present = dict(leaves_with_names(params))
    names: list[str] = []
    if "blocks" in tensors:
        names += [f"{p}.{lin}.weight" for p in block_prefixes(params) for lin in LINEARS
                  if f"{p}.{lin}.weight" in present]
    if "embeddings" in tensors:
        names.append("tok_embed.weight")
    if "head" in tensors:
        names.append("lm_head.weight" if "lm_head.weight" in present else "tok_embed.weight")
    names = list(dict.fromkeys(names))
    for n in names:
        if not isinstance(present[n], torch.Tensor):
            raise ConfigError(f"prune: tensor {n} is already quantized ({type(present[n]).__name__}); "
                              "prune before quantizing")
    return names


def category(name: str) -> str:
    """The report group of a tensor: linear weights, biases, norms or embeddings (incl. head)."""
    if "embed" in name or name.startswith("lm_head"):
        return "embeddings"
    if "norm" in name:
        return "norms"
    if name.endswith(".bias"):
        return "biases"
    return "linear_weights"
