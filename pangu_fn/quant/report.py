"""Byte accounting of a quantization: stored bytes per tensor kind, before and after."""

from __future__ import annotations

from typing import Any

import torch

from ..params import Params
from ..tree import flatten, leaf_nbytes, leaves_with_names

KINDS = ("attention", "mlp", "embedding", "head", "norm", "bias", "other")


def tensor_kind(name: str, tied: bool) -> str:
    """The report row a leaf belongs to, from its dotted name."""
    parts = name.split(".")
    if parts[0] == "tok_embed":
        return "head" if tied else "embedding"  # a tied table is read as the head every token
    if parts[0] in ("pos_embed", "query_embed"):
        return "embedding"
    if parts[0] == "lm_head":
        return "head"
    if parts[-1] == "bias":
        return "bias"
    if len(parts) >= 2 and parts[-2].endswith("norm"):
        return "norm"
    return "attention" if "attn" in parts else "mlp" if "mlp" in parts else "other"


def scheme_of(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            leaf.dtype, str(leaf.dtype).replace("torch.", ""))
    return leaf.scheme


def size_report(before: Params, after: Params) -> dict[str, Any]:
    """{"kinds": [{kind, tensors, bytes_before, bytes_after, ratio, schemes_after}], "bytes_before",
    "bytes_after", "compression", "resident_bytes_after"} over the stored bytes of two trees with
    the same leaf names (a tied embedding is counted as the head); the last entry is what the
    quantized tree holds in memory, kernel copies included."""
    tied = "lm_head" not in before
    b, a = flatten(before), flatten(after)
    rows: dict[str, dict[str, Any]] = {}
    for name, leaf in b.items():
        kind = tensor_kind(name, tied)
        row = rows.setdefault(kind, {"kind": kind, "tensors": 0, "bytes_before": 0, "bytes_after": 0,
                                     "schemes_after": {}})
        row["tensors"] += 1
        row["bytes_before"] += leaf_nbytes(leaf)
        row["bytes_after"] += leaf_nbytes(a[name])
        scheme = scheme_of(a[name])
        row["schemes_after"][scheme] = row["schemes_after"].get(scheme, 0) + 1
    ordered = [rows[k] for k in KINDS if k in rows]
    for row in ordered:
        row["ratio"] = round(row["bytes_before"] / max(row["bytes_after"], 1), 3)
    total_b = sum(r["bytes_before"] for r in ordered)
    total_a = sum(r["bytes_after"] for r in ordered)
    return {"kinds": ordered, "bytes_before": total_b, "bytes_after": total_a,
            "compression": round(total_b / max(total_a, 1), 3), "resident_bytes_after": resident_nbytes(after)}


def resident_nbytes(tree: Params) -> int:
    """Bytes the tree's leaves hold in memory, kernel copies included (`nbytes` counts stored bytes)."""
    return sum(getattr(x, "resident_nbytes", None) or leaf_nbytes(x) for _, x in leaves_with_names(tree))
