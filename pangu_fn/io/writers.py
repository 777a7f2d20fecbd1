"""Writers from a `Source`: our folder, Hugging Face GPT-2 / LLaMA (openPangu) folders, the
PanGu-α gpt_pangu folder, MindSpore `.ckpt` (three namings) and the PanGu-α Megatron `.pt`. Each writes atomically (a temporary name
renamed into place), refuses a destination that equals or contains the source, replaces an
existing one only with `overwrite=True` (see `destination.py`) and, except the Hugging Face one (which needs the whole tree to fuse or
rename), streams one tensor at a time, so memory stays about one tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..params import parse_dtype
from . import alpha, hf
from .atomic import atomic_dir, atomic_file
from .destination import check_destination
from .mindspore import write_checkpoint
from .safetensors_io import write_sharded
from .source import Source

OnTensor = Callable[[str, int], None]
WRITERS = ("pangu-fn", "hf", "gpt_pangu", "mindspore", "megatron")


def _target_dtype(t_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t_dtype.is_floating_point else t_dtype


def source_paths(source: Source) -> list[Path]:
    """The files and folders `source` was read from (none for an in-memory tree)."""
    return [p for p in {source.path, source.folder} if p is not None and (p.exists() or p.is_symlink())]


def write_ours(source: Source, path: str | Path, dtype: str | torch.dtype | None = None,
               shard_size: int = 2 * 1024**3, extra_files: dict[str, bytes] | None = None,
               on_tensor: OnTensor | None = None, *, overwrite: bool = False) -> Path:
    """Our folder (config.json + safetensors, sharded past `shard_size`). Floating tensors are
    cast to `dtype` if given, except those of quantized leaves (their scales keep their dtype).
    Raises ConfigError for a destination `check_destination` refuses."""
    from .checkpoint import FORMAT, VERSION

    check_destination(path, overwrite=overwrite, sources=source_paths(source))

    cast = parse_dtype(dtype) if dtype is not None else None
    leaf_prefixes = tuple(f"{name}." for name in source.leaves)
    plan = [(name, ref.dtype if name.startswith(leaf_prefixes) else _target_dtype(ref.dtype, cast), ref.shape)
            for name, ref in source.tensors.items()]
    meta = {"format": FORMAT, "version": str(VERSION)}
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(
            {"format": FORMAT, "version": VERSION, "config": source.cfg.to_dict(),
             **({"leaves": source.leaves} if source.leaves else {})}, indent=2))
        write_sharded(tmp, plan, lambda n: source.tensors[n].read(), shard_size, meta, on_tensor)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def write_hf(source: Source, path: str | Path, dtype: str | torch.dtype | None = None,
             shard_size: int = 5 * 1024**3, extra_files: dict[str, bytes] | None = None,
             on_tensor: OnTensor | None = None, *, overwrite: bool = False) -> Path:
    """A Hugging Face GPT-2 or LLaMA (openPangu) folder; see `hf.save_hf`. Reads the whole tree."""
    from ..tree import unflatten

    if source.leaves:
        raise ConfigError("write_hf: the model has quantized leaves; dequantize before writing HF layouts")
    check_destination(path, overwrite=overwrite, sources=source_paths(source))
    return hf.save_hf(path, unflatten(source.flat()), source.cfg, dtype, shard_size, extra_files, on_tensor,
                      overwrite=overwrite)


def write_gpt_pangu(source: Source, path: str | Path, dtype: str | torch.dtype | None = None,
                    shard_size: int = 5 * 1024**3, extra_files: dict[str, bytes] | None = None,
                    on_tensor: OnTensor | None = None, *, overwrite: bool = False) -> Path:
    """A PanGu-α folder in the Hugging Face gpt_pangu port's names (config.json with
    `num_layers` = ours + 1, safetensors; `lm_head.weight` a copy of the embedding). The port's
    modeling code (`trust_remote_code`) is not included."""
    if source.leaves:
        raise ConfigError("write_gpt_pangu: the model has quantized leaves; dequantize first")
    check_destination(path, overwrite=overwrite, sources=source_paths(source))
    config = alpha.gpt_pangu_config_dict(source.cfg)
    plan_names = alpha.gpt_pangu_plan(source.cfg)
    cast = parse_dtype(dtype) if dtype is not None else None
    refs = {hf_name: source.tensors[ours] for hf_name, ours in plan_names.items()}
    plan = [(n, _target_dtype(r.dtype, cast), r.shape) for n, r in refs.items()]
    config["torch_dtype"] = str(cast or refs["transformer.wte.weight"].dtype).replace("torch.", "")
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_sharded(tmp, plan, lambda n: refs[n].read(), shard_size, {"format": "pt"}, on_tensor)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def write_mindspore(source: Source, path: str | Path, dtype: str | torch.dtype | None = None,
                    crc: bool = True, on_tensor: OnTensor | None = None, *, overwrite: bool = False,
                    naming: str | None = None) -> Path:
    """A PanGu-α MindSpore `.ckpt` in `naming` ("release", "modelzoo" or "mindformers"; by
    default the naming the model was read from, else "release"), `Mapping` weights stored
    `[in, out]`, in mindformers' parameter order, with the CRC trailer unless `crc` is False.
    Raises ConfigError for other families and unknown namings."""
    if source.leaves:
        raise ConfigError("write_mindspore: the model has quantized leaves; dequantize first")
    check_destination(path, overwrite=overwrite, sources=source_paths(source))
    plan = alpha.mindspore_plan(source.cfg, list(source.tensors), naming)
    cast = parse_dtype(dtype) if dtype is not None else None

    def tensors():
        for ms_name, ours, transpose in plan:
            t = source.tensors[ours].read()
            yield ms_name, (t.t() if transpose else t)

    return write_checkpoint(path, tensors(), crc=crc, dtype=cast, on_tensor=on_tensor)


def write_megatron(source: Source, path: str | Path, dtype: str | torch.dtype | None = None,
                   on_tensor: OnTensor | None = None, *, overwrite: bool = False) -> Path:
    """A PanGu-α `model_optim_rng.pt` of the Megatron GPU port (nested dicts under
    `model.language_model`, torch `[out, in]` weights, tied head), written with `torch.save`;
    reads the whole tree. Raises ConfigError for other families and untied heads."""
    if source.leaves:
        raise ConfigError("write_megatron: the model has quantized leaves; dequantize first")
    check_destination(path, overwrite=overwrite, sources=source_paths(source))
    cast = parse_dtype(dtype) if dtype is not None else None
    flat = {}
    for name, ref in source.tensors.items():
        flat[name] = ref.read().to(_target_dtype(ref.dtype, cast)).contiguous()
        if on_tensor is not None:
            on_tensor(name, flat[name].nbytes)
    state = alpha.megatron_state(source.cfg, flat)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def check_writable(source: Source, fmt: str, naming: str | None = None) -> None:
    """Raise ConfigError now (before anything is written) if `fmt` (with MindSpore `naming`)
    cannot hold this model."""
    cfg = source.cfg
    if fmt != "pangu-fn" and source.leaves:
        raise ConfigError(f"the {fmt} layout cannot hold quantized leaves; dequantize first or write pangu-fn")
    if naming is not None and fmt != "mindspore":
        raise ConfigError(f"--layout {naming!r} names MindSpore tensors; the output layout is {fmt!r}")
    if fmt == "mindspore":
        alpha.mindspore_plan(cfg, list(source.tensors), naming)
    elif fmt == "megatron":
        alpha.megatron_state(cfg, dict.fromkeys(source.tensors))
    elif fmt == "gpt_pangu":
        alpha.gpt_pangu_config_dict(cfg)
        alpha.gpt_pangu_plan(cfg)
    elif fmt == "hf":
        if cfg.family == "alpha":
            raise ConfigError("PanGu-α (query layer) has no GPT-2/LLaMA layout; use --to gpt_pangu")
        if cfg.family == "gpt":
            hf._gpt2_config(cfg)


def output_format(dst: Path, to: str | None, cfg: ModelConfig) -> str:
    """The writer for `dst`: `to` if given, else MindSpore for a `.ckpt` name, else ours."""
    if to is not None:
        if to not in WRITERS:
            raise ConfigError(f"unknown output format {to!r}; expected one of {list(WRITERS)}")
        return to
    return "mindspore" if dst.suffix == ".ckpt" else "pangu-fn"
