"""PruneReport: what a pruning run did, as JSON-able facts and as printed text."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..params import Params
from ..tree import count_params, leaves_with_names, nbytes
from .scope import category


def _zeros(leaf: Any) -> int:
    return leaf.numel() - int(torch.count_nonzero(leaf)) if isinstance(leaf, torch.Tensor) else 0


def _split(name: str) -> tuple[str, str]:
    """"blocks.3.attn.q.weight" -> ("blocks.3", "q"); other names -> (name, "")."""
    for marker in (".attn.", ".mlp."):
        if marker in name:
            prefix, rest = name.split(marker, 1)
            return prefix, rest.removesuffix(".weight")
    return name, ""


def _stats(numel: int, zeros: int) -> dict[str, Any]:
    return {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}


@dataclass
class PruneReport:
    """Facts of one `prune` call.

    - `tensors`: per tensor in scope: name, shape before/after, zeros, sparsity (zeros / numel).
    - `scope`: the tensors in scope together: numel before/after, zeros, sparsity, and
      `reduction` = 1 - nonzeros after / numel before (zeroed and removed weights together).
    - `groups`: the whole model after pruning by kind ("linear_weights", "biases", "norms",
      "embeddings" incl. the LM head): numel, zeros, sparsity.
    - `parameters` / `nonzero_parameters` / `bytes`: before and after (dense storage: zeros
      still take bytes; only structured pruning makes tensors smaller).
    - `perplexity`: held-out perplexity before and after, when evaluation tokens were given.
    - `removed`: structured pruning, per block: original KV groups, query heads and FFN
      neurons removed, and widths before/after.
    - `rounds`: iterative pruning, per round: schedule target, sparsity reached, recovery loss.
    """

    method: str
    summary: str
    recipe: dict[str, Any]
    tensors: list[dict[str, Any]]
    scope: dict[str, Any]
    groups: dict[str, dict[str, Any]]
    parameters: dict[str, int]
    nonzero_parameters: dict[str, int]
    bytes: dict[str, int]
    perplexity: dict[str, float] | None = None
    removed: dict[str, dict[str, Any]] | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A human-readable summary: per-block sparsity of each linear, totals, perplexity."""
        s = self.scope
        lines = [f"pruned: {self.summary}",
                 (f"scope: {len(self.tensors)} tensors, {s['numel_before']:,} -> {s['numel']:,} weights, "
                 f"{s['zeros']:,} zeros (sparsity {s['sparsity']:.2%}), reduction vs dense {s['reduction']:.2%}")]
        by_block: dict[str, list[str]] = {}
        any_zeros = s["zeros"] > 0  # structured pruning alone leaves no zeros: show widths only
        for t in self.tensors:
            prefix, linear = _split(t["name"])
            cell = f"{linear} {t['sparsity']:6.2%}".strip() if any_zeros else ""
            by_block.setdefault(prefix, []).append(cell)
        for prefix, cells in by_block.items():
            widths = ""
            if self.removed and prefix in self.removed:
                r = self.removed[prefix]
                widths = (f"  heads {r['heads_before']}->{r['heads_after']} "
                          f"(kv {r['kv_heads_before']}->{r['kv_heads_after']}), "
                          f"ffn {r['ffn_before']}->{r['ffn_after']}")
            lines.append((f"  {prefix:<16} " + "  ".join(c for c in cells if c) + widths).rstrip())
        lines.append("whole model: " + ", ".join(f"{k} {v['sparsity']:.2%} of {v['numel']:,}"
                                                 for k, v in self.groups.items()))
        p, nz, b = self.parameters, self.nonzero_parameters, self.bytes
        lines.append(f"parameters {p['before']:,} -> {p['after']:,} ({p['after'] / p['before']:.1%}); "
                     f"non-zero {nz['before']:,} -> {nz['after']:,} ({nz['after'] / nz['before']:.1%}); "
                     f"bytes {b['before'] / 2**20:.2f} -> {b['after'] / 2**20:.2f} MiB")
        if self.perplexity:
            lines.append(f"held-out perplexity {self.perplexity['before']:.3f} -> {self.perplexity['after']:.3f}")
        for r in self.rounds:
            target = (f"sparsity target {r['sparsity_target']:.2%}" if "sparsity_target" in r
                      else f"heads {r['heads_target']:.2%} ffn {r['ffn_target']:.2%}")
            loss = (f", recovery loss {r['recovery_loss_first']:.3f} -> {r['recovery_loss_last']:.3f}"
                    if "recovery_loss_first" in r else "")
            ppl = f", perplexity {r['perplexity']:.3f}" if "perplexity" in r else ""
            lines.append(f"  round {r['round']}: {target}, scope sparsity {r['sparsity']:.2%}{loss}{ppl}")
        return "\n".join(lines)


def build_report(before: Params, after: Params, names: list[str], method: str, summary: str,
                 recipe: dict[str, Any], perplexity: dict[str, float] | None = None,
                 removed: dict[str, dict[str, Any]] | None = None,
                 rounds: list[dict[str, Any]] | None = None) -> PruneReport:
    """Compare the trees before and after pruning over the tensors in scope `names`."""
    old, new = dict(leaves_with_names(before)), dict(leaves_with_names(after))
    counted: dict[int, int] = {}  # zeros by leaf identity: untouched leaves are shared, count once

    def zeros(leaf: Any) -> int:
        if id(leaf) not in counted:
            counted[id(leaf)] = _zeros(leaf)
        return counted[id(leaf)]

    tensors = []
    for n in names:
        z = zeros(new[n])
        tensors.append({"name": n, "shape_before": list(old[n].shape), "shape": list(new[n].shape),
                        **_stats(new[n].numel(), z)})
    numel_before = sum(old[n].numel() for n in names)
    total = _stats(sum(t["numel"] for t in tensors), sum(t["zeros"] for t in tensors))
    nonzero = total["numel"] - total["zeros"]
    scope = {"numel_before": numel_before, **total, "reduction": 1 - nonzero / numel_before if numel_before else 0.0}
    groups: dict[str, list[int]] = {}
    for n, leaf in new.items():
        g = groups.setdefault(category(n), [0, 0])
        g[0] += int(leaf.numel())
        g[1] += zeros(leaf)
    nz_before = sum(int(leaf.numel()) - zeros(leaf) for leaf in old.values())
    nz_after = sum(int(leaf.numel()) - zeros(leaf) for leaf in new.values())
    return PruneReport(
        method=method, summary=summary, recipe=recipe, tensors=tensors, scope=scope,
        groups={k: _stats(*v) for k, v in groups.items()},
        parameters={"before": count_params(before), "after": count_params(after)},
        nonzero_parameters={"before": nz_before, "after": nz_after},
        bytes={"before": nbytes(before), "after": nbytes(after)},
        perplexity=perplexity, removed=removed, rounds=list(rounds or []))
