"""load_shard: one rank's part of a checkpoint, reading as little of the rest as the layout allows.

Our folder (`config.json` + `model.safetensors`, or shards listed in
`model.safetensors.index.json`; quantized leaves as their stored tensors plus a description)
and Hugging Face LLaMA-layout folders in safetensors (openPangu-Embedded's own release layout:
their tensors are ours renamed, never transposed or fused) are read slice by slice: each
file's header goes through the strict reader (`io/safetensors_io.read_header`) first, then
`safetensors.safe_open(...).get_slice` copies out just the rows or columns the rank's `Split`
names, so a rank's memory is about its share of the weights plus the replicated rest. A
MindSpore `.ckpt` is read slice by slice too, through its `Source` (`TensorRef.read_part`: the
reader seeks to the slice's rows, or to each row's columns). Every other layout `load` reads
(PanGu-α's `gpt_pangu` port, `.pt`, GPT-2 with its fused, transposed projections) is read one
whole tensor at a time through its `Source`, each cut before the next is read: the rank's
share plus its largest tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import FormatError
from ..io import hf
from ..io.checkpoint import FORMAT, load_config, open_source, read_config_json
from ..io.leaves import leaf_type
from ..io.safetensors_io import read_header
from ..params import Params, column_major_fp32, is_matmul_weight, laid_out, parse_dtype, validate
from ..tree import unflatten
from .plan import REPLICATE, split_plan
from .shard import wrap
from .slicing import Reader, cut, cut_column_major, described, tensor_reader

INDEX = "model.safetensors.index.json"


def load_shard(path: str | Path, rank: int, world_size: int, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, group: Any = None, *,
               config: ModelConfig | str | Path | None = None) -> tuple[Params, ModelConfig]:
    """(rank `rank`'s sharded params, cfg) from a checkpoint, equal to
    `shard(load(path)[0], cfg, rank, world_size)`. Our folders and Hugging Face LLaMA-layout
    folders in safetensors are read slice by slice (`reads_slices`), and so is a MindSpore
    `.ckpt`; other layouts `load` reads (`config` as there) are read one whole tensor at a
    time, each cut before the next is read (the GPT-2 layout reads all its tensors first). Each
    part is cast to `dtype`, moved to `device` (default CPU) and laid out as `decode_layout`
    says before the next is read (fp32 CPU matrices it stores column-major are filled so from
    slabs), so the
    rank's peak memory is about its share. Raises FormatError for unreadable files, missing tensors or
    files that disagree with their index, ShapeError for shapes that disagree with the config,
    ConfigError for a world size the model cannot split."""
    folder = Path(path)
    if reads_slices(folder):
        cfg, leaves, stored_shape, stored_dtype, reader = _sliced(folder)
    else:
        source = open_source(folder, config=config)
        cfg, leaves, refs = source.cfg, source.leaves, source.tensors
        stored_shape = {name: tuple(ref.shape) for name, ref in refs.items()}
        stored_dtype = {name: ref.dtype for name, ref in refs.items()}

        def reader(name: str) -> Reader:
            part = refs[name].read_part  # a MindSpore .ckpt reads just the slice
            return part if part is not None else tensor_reader(refs[name].read())  # or one whole tensor, cut

    owner = {f"{leaf}.{suffix}": leaf for leaf in leaves for suffix in _suffixes(stored_shape, leaf)}
    shapes = {name: shape for name, shape in stored_shape.items() if name not in owner}
    shapes.update({leaf: tuple(desc.get("shape", ())) for leaf, desc in leaves.items()})
    validate(unflatten({n: torch.empty(s, device="meta") for n, s in shapes.items()}), cfg)
    plan = split_plan(shapes, cfg, rank, world_size)
    dev, want = torch.device(device or "cpu"), (None if dtype is None else parse_dtype(dtype))
    tied = "lm_head.weight" not in shapes
    flat: dict[str, Any] = {}
    for name, shape in tqdm(shapes.items(), desc=f"load rank {rank}", disable=len(shapes) < 200,
                            dynamic_ncols=True):
        split, k = plan.get(name, REPLICATE), (shape[1] if len(shape) > 1 else 0)
        if name in leaves:
            parts = {s: cut(reader(f"{name}.{s}"), stored_shape[f"{name}.{s}"], k, split, f"{name}.{s}")
                     for s in _suffixes(stored_shape, name)}
            leaf = leaf_type(leaves[name]["kind"]).from_tensors(parts, described(leaves[name], shape, split))
        elif _fills_column_major(name, shape, stored_dtype[name], want, dev, tied):
            flat[name] = cut_column_major(reader(name), shape, split, torch.float32)
            continue
        else:
            leaf = cut(reader(name), shape, k, split, name)
        flat[name] = laid_out(name, _cast(leaf, want).to(dev), tied)  # each placed before the next is read
    return wrap(unflatten(flat), plan, cfg, group), cfg


def _cast(leaf: Any, dtype: torch.dtype | None) -> Any:
    """`leaf` in compute dtype `dtype` as `params.astype` casts it (None: as stored)."""
    if dtype is None or (isinstance(leaf, torch.Tensor) and not leaf.is_floating_point()):
        return leaf
    return leaf.to(dtype) if isinstance(leaf, torch.Tensor) else leaf.astype(dtype)


def _fills_column_major(name: str, shape: tuple[int, ...], stored: torch.dtype, want: torch.dtype | None,
                        device: torch.device, tied: bool) -> bool:
    """Whether a plain tensor ends up an fp32 CPU matmul weight that `decode_layout` stores
    column-major (where the native fp32 kernel does not run), so `cut_column_major` fills it
    straight from the file."""
    final = want if want is not None and stored.is_floating_point else stored
    return (final == torch.float32 and device.type == "cpu" and len(shape) == 2
            and is_matmul_weight(name, tied) and column_major_fp32())


def reads_slices(path: str | Path) -> bool:
    """Whether `load_shard` reads `path` slice by slice: our folder, or a Hugging Face
    LLaMA-layout folder, in safetensors."""
    folder = Path(path)
    if not ((folder / "config.json").is_file() and any(folder.glob("*.safetensors"))):
        return False
    try:
        d = read_config_json(folder)
    except FormatError:
        return False
    return d.get("format") == FORMAT or d.get("model_type") in hf.LLAMA_TYPES


def _sliced(folder: Path) -> tuple[ModelConfig, dict[str, Any], dict[str, tuple[int, ...]],
                                   dict[str, torch.dtype], Any]:
    """(cfg, leaf descriptions, {our name: stored shape}, {our name: stored dtype}, name -> Reader
    of slices) of a folder `reads_slices` accepts."""
    d = read_config_json(folder)
    cfg = load_config(folder)  # checks our format version / reads an HF config
    leaves: dict[str, dict[str, Any]] = d.get("leaves", {}) if d.get("format") == FORMAT else {}
    stored = {name: (file, info) for file in _weight_files(folder) for name, info in read_header(file)[0].items()}
    names = _stored_names(d, cfg, folder, stored)
    handles: dict[Path, Any] = {}

    def reader(name: str) -> Reader:
        file = stored[names[name]][0]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        part = handles[file].get_slice(names[name])
        return lambda dim, a, b: part[a:b] if dim == 0 else part[:, a:b]

    return (cfg, leaves, {ours: tuple(stored[theirs][1].shape) for ours, theirs in names.items()},
            {ours: stored[theirs][1].dtype for ours, theirs in names.items()}, reader)


def _stored_names(d: dict[str, Any], cfg: ModelConfig, folder: Path, stored: dict[str, Any]) -> dict[str, str]:
    """{our flat name: the name the folder stores it under}."""
    if d.get("format") == FORMAT:
        return {name: name for name in stored}
    names = hf._llama_names(cfg, lambda name: name)  # our name -> its HF name
    missing = [theirs for theirs in names.values() if theirs not in stored]
    if missing:
        raise FormatError(f"{folder}: missing tensor {missing[0]!r} of a {d.get('model_type')} model")
    return names


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


def _suffixes(stored: dict[str, Any], leaf: str) -> list[str]:
    prefix = leaf + "."
    found = [n[len(prefix):] for n in stored if n.startswith(prefix)]
    if not found:
        raise FormatError(f"leaf {leaf}: described in config.json but no tensors {prefix}* stored")
    return found
