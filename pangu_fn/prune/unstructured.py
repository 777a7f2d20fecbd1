"""Unstructured (magnitude, Wanda) and semi-structured N:M masks with exact counts."""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ConfigError, ShapeError
from ..params import Params
from ..tree import map_with_names
from .calibrate import calibration_windows, input_norms
from .recipe import PruneRecipe, count_for
from .scope import get, scope_names
from .select import n_of_m_mask, smallest_k_masks, smallest_k_per_row, sort_keys


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda's score `|W_ij| * ||X_j||_2` (float32) for `weight [out, in]` and the input-channel
    norms `[in]` over the calibration tokens."""
    return weight.detach().float().abs() * norms.float()[None, :]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs()


def compute_masks(params: Params, recipe: PruneRecipe, cfg: ModelConfig | None = None, calib: Any = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """{weight name: bool mask (True = zero it)} for a "magnitude", "wanda" or "n:m" recipe.

    Exactly `count_for(sparsity, n)` entries are selected per group (tensor, row, or all
    tensors in scope for "global"); n:m selects exactly `n` of every `m` consecutive inputs.
    Weights already zero are selected first. Wanda scores need `cfg` and `calib` tokens.
    Raises ConfigError (missing cfg / calibration) or ShapeError (inputs not divisible by m)."""
    names = scope_names(params, recipe.tensors)
    kind = recipe.score if recipe.method == "n:m" else recipe.method
    if kind not in ("magnitude", "wanda"):
        raise ConfigError(f"prune: {recipe.method!r} is not an unstructured method")
    norms: dict[str, torch.Tensor] = {}
    if kind == "wanda":
        if cfg is None or calib is None:
            raise ConfigError("prune: Wanda scores need the model config (cfg=...) and calibration tokens (calib=...)")
        tokens = calibration_windows(calib, recipe.calib_samples, recipe.calib_seq_len, recipe.seed)
        norms = input_norms(params, cfg, names, tokens, recipe.batch_size, progress)

    def keys(name: str) -> torch.Tensor:
        w = get(params, name)
        score = wanda_scores(w, norms[name]) if kind == "wanda" else magnitude_scores(w)
        return sort_keys(score, w)

    if recipe.method == "n:m":
        for name in names:
            cols = get(params, name).shape[1]
            if cols % recipe.m:
                raise ShapeError(f"prune n:m: tensor {name} has {cols} inputs, not a multiple of m={recipe.m}")
    if recipe.method != "n:m" and recipe.granularity == "global":
        total = sum(get(params, n).numel() for n in names)
        key_fns = [lambda n=n: keys(n) for n in names]  # recomputed per pass: never all keys at once
        return dict(zip(names, smallest_k_masks(key_fns, count_for(recipe.sparsity, total), total)))

    masks = {}
    for name in tqdm(names, desc=f"prune {recipe.method}", disable=not progress, dynamic_ncols=True):
        k = keys(name)
        if recipe.method == "n:m":
            masks[name] = n_of_m_mask(k, recipe.n, recipe.m)
        elif recipe.granularity == "row":
            masks[name] = smallest_k_per_row(k, count_for(recipe.sparsity, k.shape[1]))
        else:
            masks[name] = smallest_k_masks([k], count_for(recipe.sparsity, k.numel()))[0]
    return masks


def apply_masks(params: Params, masks: dict[str, torch.Tensor]) -> Params:
    """A new tree with the masked entries zeroed (other leaves are shared, never modified)."""
    return map_with_names(lambda name, leaf: leaf.masked_fill(masks[name], 0) if name in masks else leaf, params)
