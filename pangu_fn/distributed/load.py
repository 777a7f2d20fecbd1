"""load_shard: one rank's part of a checkpoint, reading only its slices.

Reads our folder (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`; quantized leaves as their stored tensors plus a description)
and Hugging Face LLaMA-layout folders in safetensors (openPangu-Embedded's own release layout:
their tensors are ours renamed, never transposed or fused). Each file's header goes through
the strict reader (`io/safetensors_io.read_header`) first; then
`safetensors.safe_open(...).get_slice` copies out just the rows or columns the rank's `Split`
names, so a rank's memory is about its share of the weights plus the replicated rest. Other
layouts (GPT-2 with its fused, transposed projections, PanGu-α, MindSpore, .pt):
`pangu convert` them to our folder first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import FormatError
from ..io import hf
from ..io.checkpoint import FORMAT, load_config, read_config_json
from ..io.leaves import leaf_type
from ..io.safetensors_io import read_header
from ..params import Params, astype, parse_dtype, to_device, validate
from ..tree import unflatten
from .plan import REPLICATE, split_plan
from .shard import wrap
from .slicing import Reader, cut, described

INDEX = "model.safetensors.index.json"


def load_shard(path: str | Path, rank: int, world_size: int, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, group: Any = None) -> tuple[Params, ModelConfig]:
    """(rank `rank`'s sharded params, cfg) from our checkpoint folder or a Hugging Face
    LLaMA-layout folder `path`, equal to `shard(load(path)[0], cfg, rank, world_size)` without
    reading the other ranks' slices.
    Cast to `dtype` and moved to `device` (default CPU) after slicing. Raises FormatError for
    another layout, missing tensors or files that disagree with their index, ShapeError for shapes
    that disagree with the config, ConfigError for a world size the model cannot split."""
    folder = Path(path)
    d = read_config_json(folder)
    cfg = load_config(folder)  # checks our format version / reads an HF config
    leaves: dict[str, dict[str, Any]] = d.get("leaves", {}) if d.get("format") == FORMAT else {}
    stored = {name: (file, info) for file in _weight_files(folder) for name, info in read_header(file)[0].items()}
    names = _stored_names(d, cfg, folder, stored)
    infos = {ours: stored[theirs] for ours, theirs in names.items()}
    owner = {f"{leaf}.{suffix}": leaf for leaf in leaves for suffix in _suffixes(infos, leaf)}
    shapes = {name: tuple(info.shape) for name, (_, info) in infos.items() if name not in owner}
    shapes.update({leaf: tuple(desc.get("shape", ())) for leaf, desc in leaves.items()})
    validate(unflatten({n: torch.empty(s, device="meta") for n, s in shapes.items()}), cfg)
    plan = split_plan(shapes, cfg, rank, world_size)
    handles: dict[Path, Any] = {}

    def reader(name: str) -> Reader:
        file = infos[name][0]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        part = handles[file].get_slice(names[name])
        return lambda dim, a, b: part[a:b] if dim == 0 else part[:, a:b]

    flat: dict[str, Any] = {}
    for name, shape in shapes.items():
        split, k = plan.get(name, REPLICATE), (shape[1] if len(shape) > 1 else 0)
        if name in leaves:
            parts = {s: cut(reader(f"{name}.{s}"), tuple(infos[f"{name}.{s}"][1].shape), k, split, f"{name}.{s}")
                     for s in _suffixes(infos, name)}
            flat[name] = leaf_type(leaves[name]["kind"]).from_tensors(parts, described(leaves[name], shape, split))
        else:
            flat[name] = cut(reader(name), shape, k, split, name)
    handles.clear()
    params = unflatten(flat)
    if dtype is not None:
        params = astype(params, parse_dtype(dtype))
    return wrap(to_device(params, device or "cpu"), plan, cfg, group), cfg


def _stored_names(d: dict[str, Any], cfg: ModelConfig, folder: Path, stored: dict[str, Any]) -> dict[str, str]:
    """{our flat name: the name the folder stores it under}."""
    if d.get("format") == FORMAT:
        return {name: name for name in stored}
    if hf.is_hf_config(d) and d.get("model_type") in hf.LLAMA_TYPES:
        names = hf._llama_names(cfg, lambda name: name)  # our name -> its HF name
        missing = [theirs for theirs in names.values() if theirs not in stored]
        if missing:
            raise FormatError(f"{folder}: missing tensor {missing[0]!r} of a {d.get('model_type')} model")
        return names
    raise FormatError(f"{folder}: load_shard reads pangu-fn folders and Hugging Face LLaMA-layout folders, found "
                      f"format {d.get('format')!r}, model_type {d.get('model_type')!r}; convert it first with "
                      "`pangu convert`")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of our folder: those its index lists, or `model.safetensors`."""
    index = folder / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: expected a JSON object with a weight_map, found {e!r}") from None
        root = folder.resolve()
        paths = [(folder / str(f)).resolve() for f in files]
        bad = [p for p in paths if root not in p.parents or not p.is_file()]
        if bad:
            raise FormatError(f"{index}: lists {bad[0].name}, not a file in {folder}")
        return paths
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FormatError(f"{folder}: expected model.safetensors or {INDEX}, found neither")
    return [single]


def _suffixes(infos: dict[str, Any], leaf: str) -> list[str]:
    prefix = leaf + "."
    found = [n[len(prefix):] for n in infos if n.startswith(prefix)]
    if not found:
        raise FormatError(f"leaf {leaf}: described in config.json but no tensors {prefix}* stored")
    return found
