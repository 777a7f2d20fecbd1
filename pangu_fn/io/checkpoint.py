"""save / load: our checkpoint folder, and the other layouts `load` recognises.

Our folder: `config.json` (`{"format": "pangu-fn", "version": 1, "config": {...}}`, plus
"leaves" describing quantized leaves, see `io/leaves.py`) and
`model.safetensors` with dotted tree names, or shards `model-0000K-of-0000N.safetensors`
plus `model.safetensors.index.json` past `shard_size` bytes. A tied LM head is not stored.
`load` also reads Hugging Face GPT-2 and LLaMA/openPangu folders (see `io/hf.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import FormatError
from ..params import Params, astype, parse_dtype, to_device, validate
from ..tree import flatten, unflatten
from . import hf, leaves
from .atomic import atomic_dir
from .store import TensorStore

FORMAT, VERSION = "pangu-fn", 1
DEFAULT_SHARD_SIZE = 2 * 1024**3


def save(path: str | Path, params: Params, cfg: ModelConfig, shard_size: int = DEFAULT_SHARD_SIZE,
         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write params and config to the folder `path` atomically (a temporary folder renamed
    into place). Tensors are split into shards of at most `shard_size` bytes (a single
    larger tensor gets a shard of its own). `extra_files` (name -> bytes) are copied in,
    e.g. a tokenizer. Returns the path."""
    validate(params, cfg)
    tensors, described = leaves.encode(flatten(params))
    flat = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in flat.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": FORMAT, "version": str(VERSION)}
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
             **({"leaves": described} if described else {})}, indent=2))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            n = len(shards)
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in flat.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise FormatError(f"{path}: expected a model folder with config.json, found none")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{f}: not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{f}: expected a JSON object, found {type(d).__name__}")
    return d


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a folder in any layout `load` reads."""
    d = read_config_json(Path(path))
    if d.get("format") == FORMAT:
        _check_version(d, Path(path))
        return ModelConfig.from_dict(d["config"])
    if hf.is_hf_config(d):
        return hf.config_from_hf(d)
    raise FormatError(f"{path}/config.json: unknown layout; expected format {FORMAT!r} or a "
                      f"Hugging Face model_type (gpt2, llama, PanguEmbedded), "
                      f"found model_type {d.get('model_type')!r} and keys {sorted(d)[:8]}")


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> tuple[Params, ModelConfig]:
    """(params, cfg) from a folder: ours, or a Hugging Face GPT-2 / LLaMA / openPangu folder
    (detected from config.json). Tensors are moved to `device` and, if given, cast to `dtype`.
    Raises FormatError for unreadable folders and ShapeError for tensors that disagree with
    the config."""
    path = Path(path)
    d = read_config_json(path)
    cfg = load_config(path)
    store = TensorStore.open(path)
    if d.get("format") == FORMAT:
        flat = leaves.decode({name: store.get(name) for name in store.keys()}, d.get("leaves", {}))
    else:
        flat = hf.hf_to_flat(store.get, store.keys(), cfg, source=str(path))
    params = unflatten(flat)
    validate(params, cfg)
    if dtype is not None:
        params = astype(params, parse_dtype(dtype))
    if device is not None:
        params = to_device(params, device)
    return params, cfg


def _check_version(d: dict[str, Any], path: Path) -> None:
    if not isinstance(d.get("version"), int) or d["version"] > VERSION:
        raise FormatError(f"{path}/config.json: format version {d.get('version')!r} is newer than "
                          f"this pangu-fn reads ({VERSION}); upgrade pangu-fn")
