"""Structured pruning: remove whole KV groups (a KV head with its query heads) and FFN neurons,
slicing the tensors so the model is physically smaller.

Units of one block with `n_kv` KV heads, `G = heads / n_kv` query heads per KV head, head
size D and FFN width F (query head h reads KV head h // G, as SDPA's `enable_gqa` does):
- KV group g owns rows `g*G*D .. (g+1)*G*D` of q (weight and bias), rows `g*D .. (g+1)*D` of
  k and v, and the same columns of o as its q rows (o's bias stays).
- FFN neuron j owns row j of gate and up (weight and bias) and column j of down (down's bias stays).
Removing a unit is the same function as zeroing its o columns / down column, so a pruned
model computes exactly what the dense model computes with those units zeroed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..params import Params, layer_sizes
from .calibrate import calibration_windows, input_norms, loss_gradients
from .recipe import PruneRecipe, count_for
from .scope import block_prefixes, get


@dataclass
class UnitScores:
    """Importance of each KV group `[n_kv]` and FFN neuron `[F]` of one block (higher = keep)."""

    heads: torch.Tensor
    neurons: torch.Tensor


# reduce(name, groups, columns) -> float64 [groups] or None (no such tensor): a sum over the
# elements of tensor `name` split into `groups` equal parts along its rows (columns=False) or
# along the columns of a 2-D weight (columns=True)
Reduce = Callable[[str, int, bool], torch.Tensor | None]


def _unit_sums(block: str, reduce: Reduce, n_kv: int, width: int) -> UnitScores:
    """Sum a per-element quantity over the elements each unit of `block` owns."""
    def add(total: torch.Tensor, names: list[str], groups: int, columns: bool) -> torch.Tensor:
        for name in names:
            part = reduce(name, groups, columns)
            if part is not None:
                total = total + part.double().cpu()
        return total

    attn = [f"{block}.attn.{lin}.{kind}" for lin in ("q", "k", "v") for kind in ("weight", "bias")]
    heads = add(torch.zeros(n_kv, dtype=torch.float64), attn, n_kv, False)
    heads = add(heads, [f"{block}.attn.o.weight"], n_kv, True)
    mlp = [f"{block}.mlp.{lin}.{kind}" for lin in ("gate", "up") for kind in ("weight", "bias")]
    neurons = add(torch.zeros(width, dtype=torch.float64), mlp, width, False)
    neurons = add(neurons, [f"{block}.mlp.down.weight"], width, True)
    return UnitScores(heads, neurons)


def _grouped(t: torch.Tensor, groups: int, columns: bool) -> tuple[torch.Tensor, int | tuple[int, int]]:
    """`t` viewed so that reducing over the returned dims leaves one value per group."""
    if columns:
        return t.reshape(t.shape[0], groups, -1), (0, 2)
    return t.reshape(groups, -1), 1


def _maybe(params: Params, name: str) -> torch.Tensor | None:
    try:
        return get(params, name)
    except (KeyError, IndexError):
        return None


def unit_scores(params: Params, cfg: ModelConfig, recipe: PruneRecipe, calib: Any = None,
                progress: bool = False) -> dict[str, UnitScores]:
    """{block prefix: UnitScores} by `recipe.importance`:
    - "magnitude": the L2 norm of all parameters a unit owns;
    - "activation": sum over the unit's input columns j of o / down of ||X_j||_2 * ||W[:, j]||_2
      (calibration activations of the heads' outputs and of the FFN's hidden neurons);
    - "taylor": |sum over the unit's parameters of w * dL/dw|, the first-order change of the
      next-token loss on the calibration tokens when the unit is removed.
    Raises ConfigError when calibration tokens are needed and missing."""
    prefixes = block_prefixes(params)
    sizes = {p: layer_sizes(get(params, p), cfg) for p in prefixes}
    if recipe.importance == "magnitude":
        def square(name: str, groups: int, columns: bool) -> torch.Tensor | None:
            t = _maybe(params, name)
            if t is None:
                return None
            view, dims = _grouped(t.detach(), groups, columns)
            return torch.linalg.vector_norm(view, dim=dims, dtype=torch.float32).double() ** 2
        out = {p: _unit_sums(p, square, sizes[p].num_kv_heads, sizes[p].intermediate_size) for p in prefixes}
        return {p: UnitScores(s.heads.sqrt(), s.neurons.sqrt()) for p, s in out.items()}
    if calib is None:
        raise ConfigError(f"prune: {recipe.importance} importance needs calibration tokens (calib=...)")
    tokens = calibration_windows(calib, recipe.calib_samples, recipe.calib_seq_len, recipe.seed)
    if recipe.importance == "activation":
        names = [f"{p}.{lin}.weight" for p in prefixes for lin in ("attn.o", "mlp.down")]
        norms = input_norms(params, cfg, names, tokens, recipe.batch_size, progress)
        out = {}
        for p in prefixes:
            n_kv = sizes[p].num_kv_heads
            o, down = get(params, f"{p}.attn.o.weight").float(), get(params, f"{p}.mlp.down.weight").float()
            heads = (norms[f"{p}.attn.o.weight"] * o.norm(dim=0)).double().reshape(n_kv, -1).sum(1)
            neurons = (norms[f"{p}.mlp.down.weight"] * down.norm(dim=0)).double()
            out[p] = UnitScores(heads.cpu(), neurons.cpu())
        return out
    grads = loss_gradients(params, cfg, tokens, recipe.batch_size, progress)

    def taylor(name: str, groups: int, columns: bool) -> torch.Tensor | None:
        t = _maybe(params, name)
        if t is None:
            return None
        view, dims = _grouped(t.detach().float() * grads[name], groups, columns)
        return view.sum(dims, dtype=torch.float64)
    out = {p: _unit_sums(p, taylor, sizes[p].num_kv_heads, sizes[p].intermediate_size) for p in prefixes}
    return {p: UnitScores(s.heads.abs(), s.neurons.abs()) for p, s in out.items()}


def choose_units(scores: dict[str, torch.Tensor], counts: dict[str, int] | int, what: str) -> dict[str, list[int]]:
    """Indices (current positions) of the lowest-scoring units to remove: `counts[prefix]` from
    each block, or one number ranked over all blocks together (each block keeps its best
    unit). Ties go to the lower index. Raises ConfigError when a block would lose every unit."""
    if isinstance(counts, dict):
        out = {}
        for p, s in scores.items():
            c = counts.get(p, 0)
            if c >= s.numel():
                raise ConfigError(f"prune: removing {c} of the {s.numel()} {what} of {p} would remove every one; "
                                  f"expected fewer than {s.numel()}")
            out[p] = sorted(torch.sort(s, stable=True).indices[:c].tolist())
        return out
    candidates = []  # (score, block order, index): every unit but each block's best
    for order, (p, s) in enumerate(scores.items()):
        best = int(torch.argmax(s))
        candidates += [(float(s[i]), order, i, p) for i in range(s.numel()) if i != best]
    if counts > len(candidates):
        total = sum(s.numel() for s in scores.values())
        raise ConfigError(f"prune: removing {counts} of the {total} {what} would leave a block without any; "
                          f"at most {len(candidates)} can go")
    out = {p: [] for p in scores}
    for _, _, i, p in sorted(candidates)[:counts]:
        out[p].append(i)
    return {p: sorted(v) for p, v in out.items()}


def slice_block(block: Params, cfg: ModelConfig, drop_kv: list[int], drop_neurons: list[int]) -> Params:
    """A new block without the KV groups `drop_kv` and FFN neurons `drop_neurons` (current
    indices); untouched tensors are shared."""
    sizes = layer_sizes(block, cfg)
    d, group = cfg.head_dim, sizes.num_heads // sizes.num_kv_heads
    gone_kv, gone_f = set(drop_kv), set(drop_neurons)
    keep_kv = [g for g in range(sizes.num_kv_heads) if g not in gone_kv]
    keep_f = [j for j in range(sizes.intermediate_size) if j not in gone_f]
    device = block["attn"]["q"]["weight"].device

    def index(ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=device)

    q_rows = index([g * group * d + r for g in keep_kv for r in range(group * d)])
    kv_rows = index([g * d + r for g in keep_kv for r in range(d)])
    f_rows = index(keep_f)

    def rows(p: Params, idx: torch.Tensor) -> Params:
        return {k: v.index_select(0, idx) for k, v in p.items()}

    attn, mlp = block["attn"], block["mlp"]
    if drop_kv:
        attn = dict(attn)
        attn["q"], attn["k"], attn["v"] = rows(attn["q"], q_rows), rows(attn["k"], kv_rows), rows(attn["v"], kv_rows)
        attn["o"] = {**attn["o"], "weight": attn["o"]["weight"].index_select(1, q_rows)}
    if drop_neurons:
        mlp = dict(mlp)
        for lin in ("gate", "up"):
            if lin in mlp:
                mlp[lin] = rows(mlp[lin], f_rows)
        mlp["down"] = {**mlp["down"], "weight": mlp["down"]["weight"].index_select(1, f_rows)}
    return {**block, "attn": attn, "mlp": mlp}


def remove_units(params: Params, cfg: ModelConfig, drop_kv: dict[str, list[int]],
                 drop_neurons: dict[str, list[int]]) -> Params:
    """A new tree with the given units (current indices, by block prefix) removed."""
    out = dict(params)
    out["blocks"] = list(params["blocks"])
    for p in block_prefixes(params):
        kv, nn = drop_kv.get(p, []), drop_neurons.get(p, [])
        if not kv and not nn:
            continue
        new = slice_block(get(params, p), cfg, kv, nn)
        if p == "query_layer":
            out["query_layer"] = new
        else:
            out["blocks"][int(p.split(".")[1])] = new
    return out


class UnitTracker:
    """Original indices of the units still present in each block, so that repeated removal
    (iterative pruning) reports and counts against the dense model."""

    def __init__(self, params: Params, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.kv: dict[str, list[int]] = {}
        self.neurons: dict[str, list[int]] = {}
        self.group: dict[str, int] = {}
        for p in block_prefixes(params):
            s = layer_sizes(get(params, p), cfg)
            self.kv[p] = list(range(s.num_kv_heads))
            self.neurons[p] = list(range(s.intermediate_size))
            self.group[p] = s.num_heads // s.num_kv_heads
        self.original_kv = {p: len(v) for p, v in self.kv.items()}
        self.original_neurons = {p: len(v) for p, v in self.neurons.items()}

    def remove(self, drop_kv: dict[str, list[int]], drop_neurons: dict[str, list[int]]) -> None:
        for p in self.kv:
            gone_kv, gone_n = set(drop_kv.get(p, [])), set(drop_neurons.get(p, []))
            self.kv[p] = [g for i, g in enumerate(self.kv[p]) if i not in gone_kv]
            self.neurons[p] = [j for i, j in enumerate(self.neurons[p]) if i not in gone_n]

    def removed(self) -> dict[str, dict[str, Any]]:
        """Per block: original KV groups, query heads and neurons removed, widths before/after."""
        out = {}
        for p in self.kv:
            kv = sorted(set(range(self.original_kv[p])) - set(self.kv[p]))
            g = self.group[p]
            out[p] = {"kv_heads": kv, "heads": [h for k in kv for h in range(k * g, (k + 1) * g)],
                      "neurons": sorted(set(range(self.original_neurons[p])) - set(self.neurons[p])),
                      "heads_before": self.original_kv[p] * g, "heads_after": len(self.kv[p]) * g,
                      "kv_heads_before": self.original_kv[p], "kv_heads_after": len(self.kv[p]),
                      "ffn_before": self.original_neurons[p], "ffn_after": len(self.neurons[p])}
        return out


def explicit_plan(params: Params, recipe: PruneRecipe) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The recipe's `remove_heads` / `remove_neurons` ({block index: ids}) as per-prefix lists,
    checked against the block sizes (ConfigError for unknown blocks or ids out of range)."""
    prefixes = block_prefixes(params)
    plans: list[dict[str, list[int]]] = []
    for field, what in (("remove_heads", "KV groups"), ("remove_neurons", "FFN neurons")):
        plan = {}
        for layer, ids in dict(getattr(recipe, field)).items():
            if not 0 <= layer < len(prefixes):
                raise ConfigError(f"PruneRecipe.{field}: block {layer} does not exist; the model has "
                                  f"{len(prefixes)} blocks (0..{len(prefixes) - 1})")
            plan[prefixes[layer]] = sorted(set(ids))
        plans.append(plan)
    return plans[0], plans[1]


def check_plan(params: Params, cfg: ModelConfig, drop_kv: dict[str, list[int]],
               drop_neurons: dict[str, list[int]]) -> None:
    """ConfigError when an index is out of range or a block would lose every KV group / neuron."""
    for p in block_prefixes(params):
        s = layer_sizes(get(params, p), cfg)
        for ids, n, what in ((drop_kv.get(p, []), s.num_kv_heads, "KV groups (heads)"),
                             (drop_neurons.get(p, []), s.intermediate_size, "FFN neurons")):
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise ConfigError(f"prune: {p} has {n} {what}; cannot remove {bad[:5]}")
            if len(set(ids)) >= n:
                raise ConfigError(f"prune: removing all {n} {what} of {p}; expected to keep at least one")


def structured_step(params: Params, cfg: ModelConfig, recipe: PruneRecipe, heads: float, ffn: float,
                    tracker: UnitTracker, calib: Any = None, progress: bool = False) -> Params:
    """Remove units until the fractions `heads` (of each block's KV groups, or of all of them
    with global allocation) and `ffn` (of the FFN neurons) of the dense model are gone, the
    lowest `recipe.importance` first; or remove the recipe's explicit lists. Updates `tracker`
    and returns a new tree. Raises ConfigError when a block would lose every head or neuron."""
    if recipe.structured_explicit:
        drop_kv, drop_neurons = explicit_plan(params, recipe)
    else:
        def counts(current: dict[str, list[int]], original: dict[str, int], fraction: float) -> dict[str, int] | int:
            removed = {p: original[p] - len(current[p]) for p in original}
            if recipe.allocation == "global":
                return max(0, count_for(fraction, sum(original.values())) - sum(removed.values()))
            return {p: max(0, count_for(fraction, original[p]) - removed[p]) for p in original}

        kv_counts = counts(tracker.kv, tracker.original_kv, heads)
        n_counts = counts(tracker.neurons, tracker.original_neurons, ffn)
        if _total(kv_counts) == 0 and _total(n_counts) == 0:
            return params
        scores = unit_scores(params, cfg, recipe, calib, progress)
        drop_kv = choose_units({p: s.heads for p, s in scores.items()}, kv_counts, "KV groups (heads)")
        drop_neurons = choose_units({p: s.neurons for p, s in scores.items()}, n_counts, "FFN neurons")
        if recipe.multiple_of > 1:  # round each block's kept width, dropping its lowest-scoring neurons
            for p, s in scores.items():
                n = s.neurons.numel()
                width = rounded_width(n - len(drop_neurons[p]), n, recipe.multiple_of)
                drop_neurons[p] = sorted(torch.sort(s.neurons, stable=True).indices[: n - width].tolist())
    check_plan(params, cfg, drop_kv, drop_neurons)
    tracker.remove(drop_kv, drop_neurons)
    return remove_units(params, cfg, drop_kv, drop_neurons)


def _total(counts: dict[str, int] | int) -> int:
    return sum(counts.values()) if isinstance(counts, dict) else counts


def rounded_width(kept: int, current: int, multiple: int) -> int:
    """`kept` rounded half up to a multiple of `multiple`, at least one multiple and at most the
    largest multiple <= `current` (`current` itself when it is smaller than one multiple)."""
    if current < multiple:
        return current
    rounded = math.floor(kept / multiple + 0.5) * multiple
    return min(max(rounded, multiple), current // multiple * multiple)
