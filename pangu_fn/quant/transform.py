"""quantize(params, recipe) -> params: a new tree whose linears are quantized leaves."""

from __future__ import annotations

import fnmatch
from typing import Any

import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ConfigError
from ..params import Params
from ..tree import flatten, unflatten
from .calibrate import collect_hessians
from .gptq import gptq_int4
from .packing import to_matmul_nbits
from .recipe import WHOLE_TREE, QuantRecipe
from .rtn import int4_codes, int4_params, int8_codes, int8_scales
from .weights import DenseWeight, Int4Weight, Int8Weight

BLOCK_PREFIXES = ("blocks.", "query_layer.")


def block_linears(params: Params) -> list[str]:
    """Dotted names (without `.weight`) of the linears inside blocks, in tree order."""
    return [name[: -len(".weight")] for name, leaf in flatten(params).items()
            if name.startswith(BLOCK_PREFIXES) and name.endswith(".weight") and len(leaf.shape) == 2]


def head_name(params: Params) -> str:
    """`lm_head`, or `tok_embed` when the head is tied to the token embedding."""
    return "lm_head" if "lm_head" in params else "tok_embed"


def quantize(params: Params, recipe: QuantRecipe | str, cfg: ModelConfig | None = None,
             calib: torch.Tensor | None = None, progress: bool = False,
             hessians: dict[str, torch.Tensor] | None = None) -> Params:
    """A new tree quantized by `recipe` (the input is untouched); a scheme name such as
    `"int8"` stands for `QuantRecipe(scheme="int8")`.

    Block linears become `Int8Weight` / `Int4Weight` leaves (or stay float where the recipe
    keeps them); the LM head too if `recipe.head` asks; every other float leaf is cast to
    the compute dtype (`recipe.dtype`), and float linears are prepacked for the CPU when
    `recipe.prepack`. The gptq scheme needs `cfg` and calibration windows `calib [B, T]`
    (int64 token ids), through which the model runs once per group of linears, or the
    `hessians` that `collect_hessians` returned for them (reused across recipes).

    Raises ConfigError for a tree that already holds quantized leaves, patterns that match
    no linear, a group size that does not divide a layer's input width, or gptq without
    calibration data."""
    if isinstance(recipe, str):
        recipe = QuantRecipe(scheme=recipe)
    if not isinstance(recipe, QuantRecipe):
        raise ConfigError(f"quantize: expected a QuantRecipe or a scheme name, found {type(recipe).__name__}")
    flat = flatten(params)
    wrappers = {n: leaf for n, leaf in flat.items() if hasattr(leaf, "with_local")}
    if wrappers:  # leaves holding a local weight (tensor-parallel ones): quantize what they hold
        inner = flatten(quantize(unflatten({**flat, **{n: w.local for n, w in wrappers.items()}}),
                                 recipe, cfg, calib, progress, hessians))
        return unflatten({**inner, **{n: w.with_local(inner[n]) for n, w in wrappers.items()}})
    already = [n for n, leaf in flat.items() if not isinstance(leaf, torch.Tensor)]
    if already:
        raise ConfigError(f"quantize: expected a float tree, found {already[0]} already quantized "
                          f"({getattr(flat[already[0]], 'scheme', type(flat[already[0]]).__name__)}); "
                          "quantize the original weights")
    linears = block_linears(params)
    for pattern in recipe.patterns():
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            raise ConfigError(f"quantize: pattern {pattern!r} matches no linear; names look like "
                              f"{linears[:3]} (shell globs, e.g. '*.down')")
    plan = _plan(flat, linears, recipe, head_name(params))
    calibrated = [n for n, c in plan.items() if c == "gptq" and n not in (hessians or {})]
    hessians = dict(hessians or {})
    if calibrated:
        if cfg is None or calib is None:
            raise ConfigError("quantize: the gptq scheme needs the model config and calibration "
                              "windows (quantize(params, recipe, cfg=cfg, calib=windows))")
        hessians.update(collect_hessians(params, cfg, calib, calibrated, progress=progress))

    dtype = recipe.dtype
    tied = "lm_head" not in params
    out: dict[str, Any] = {}
    for name, leaf in tqdm(flat.items(), desc=f"quantize {recipe.scheme}", disable=not progress,
                           dynamic_ncols=True):
        linear = name[: -len(".weight")] if name.endswith(".weight") else None
        choice = plan.get(linear)
        if choice is None:
            out[name] = leaf.to(dtype) if leaf.is_floating_point() else leaf
            continue
        embedding = tied and linear == "tok_embed"
        if choice == "keep":
            out[name] = _float(leaf.to(dtype), recipe, embedding)
        elif choice == "int8":
            out[name] = quantize_int8(leaf, dtype)
        else:
            hessian = hessians.get(linear) if choice == "gptq" else None
            out[name] = quantize_int4(leaf, recipe.group_size, recipe.symmetric, dtype,
                                      hessian=hessian, damp=recipe.damp)
    return unflatten(out)


def _plan(flat: dict[str, Any], linears: list[str], recipe: QuantRecipe, head: str) -> dict[str, str]:
    """{linear name: int8 | int4 | gptq | keep} for the block linears and the head; checks
    that int4 group sizes divide the input widths."""
    if recipe.scheme in WHOLE_TREE:
        return {n: "keep" for n in linears + [head]}
    plan = {n: recipe.choice(n) for n in linears}
    plan[head] = recipe.head
    for name, choice in plan.items():
        k = flat[f"{name}.weight"].shape[1]
        if choice in ("int4", "gptq") and k % recipe.group_size:
            raise ConfigError(f"quantize: group_size {recipe.group_size} does not divide the input width "
                              f"of {name}.weight {list(flat[f'{name}.weight'].shape)}; use a group "
                              f"size that divides {k}")
    return plan


def _float(weight: torch.Tensor, recipe: QuantRecipe, embedding: bool) -> Any:
    """A float linear in the compute dtype: a `DenseWeight` for the CPU kernels when asked."""
    if recipe.prepack and weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
        return DenseWeight(weight, keep_dense=embedding)
    return weight


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Per-output-channel symmetric int8 of `weight [N, K]`; scales in `dtype`."""
    scales = int8_scales(weight, dtype)
    return Int8Weight(int8_codes(weight, scales), scales)


def quantize_int4(weight: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype,
                  hessian: torch.Tensor | None = None, damp: float = 0.01,
                  keep_qdata: bool = False) -> Int4Weight:
    """Group-wise int4 of `weight [N, K]`: round-to-nearest, or GPTQ given the input Hessian."""
    n, k = weight.shape
    if hessian is not None:
        codes, scales, zeros = gptq_int4(weight, hessian, group_size, symmetric, dtype, damp)
    else:
        groups = weight.float().reshape(n, k // group_size, group_size)
        scales, zeros = int4_params(groups, symmetric, dtype)
        codes = int4_codes(groups, scales, zeros).reshape(n, k)
    return Int4Weight(to_matmul_nbits(codes, group_size), scales, zeros, group_size, keep_qdata=keep_qdata)
