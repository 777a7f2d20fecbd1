"""save / load: our checkpoint folder, and every layout `load` recognises.

Our folder: `config.json` (`{"format": "pangu-fn", "version": 1, "config": {...}}`, plus
"leaves" describing quantized leaves, see `io/leaves.py`) and `model.safetensors` with dotted
tree names, or shards `model-0000K-of-0000N.safetensors` plus `model.safetensors.index.json`
past `shard_size` bytes. A tied LM head is not stored.

`load` detects the layout with the small table `LAYOUTS` (first match wins): our folder, a
Hugging Face GPT-2 / LLaMA / openPangu-Embedded folder (`io/hf.py`), the PanGu-α `gpt_pangu`
port, a MindSpore `.ckpt` and the Megatron port (`io/alpha.py`), and other PyTorch `.pt`
state dicts (`io/torch_pt.py`). Each opens into a `Source` (config + lazy tensors).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ConfigError, FormatError
from ..params import Params, astype, column_major_fp32, is_matmul_weight, laid_out, parse_dtype, to_device, validate
from ..tree import flatten, unflatten
from . import alpha, gguf, hf, leaves, torch_pt
from .source import CHUNK_BYTES, Source, TensorRef, WeightFiles

FORMAT, VERSION = "pangu-fn", 1
DEFAULT_SHARD_SIZE = 2 * 1024**3
MAX_CONFIG = 10_000_000  # bytes of a config.json
PT_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: how to recognise it and how to open it."""

    name: str
    what: str
    detect: Callable[[Path], bool]
    open: Callable[[Path, ModelConfig | None], Source]


def read_config_json(path: Path) -> dict[str, Any]:
    f = path / "config.json"
    if not f.is_file():
        raise FormatError(f"{path}: expected a model folder with config.json, found none")
    d = _read_json(f)
    if not isinstance(d, dict):
        raise FormatError(f"{f}: expected a JSON object, found {type(d).__name__}")
    return d


def _folder_config(pred: Callable[[dict[str, Any]], bool]) -> Callable[[Path], bool]:
    def detect(path: Path) -> bool:
        if not (path.is_dir() and (path / "config.json").is_file()):
            return False
        try:
            return pred(read_config_json(path))
        except FormatError:
            return False
    return detect


def _ckpt_file(path: Path) -> Path:
    """A `.ckpt` file, or the single `.ckpt` inside a folder."""
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) != 1:
            raise FormatError(f"{path}: expected exactly one .ckpt file, found {[f.name for f in found]}")
        return found[0]
    return path


def _is_ckpt(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".ckpt") or (
        path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.ckpt"))) == 1)


def _open_ours(path: Path, hint: ModelConfig | None) -> Source:
    d = read_config_json(path)
    cfg = our_config(d, path / "config.json")
    files = WeightFiles(path)
    refs = {name: files.ref(name) for name in files.keys()}  # noqa: SIM118  (keys() only, not a mapping)
    described = leaves.check_descriptions(d.get("leaves", {}), f"{path}/config.json")
    return Source(path, FORMAT, cfg, refs, leaves=described, folder=path)


def _open_hf(path: Path, hint: ModelConfig | None) -> Source:
    cfg = hf.config_from_hf(read_config_json(path), where=str(path / "config.json"))
    files = WeightFiles(path)
    flat = hf.hf_to_flat(files.get, files.keys(), cfg, source=str(path))
    return Source(path, "hf", cfg, {n: TensorRef.of(t) for n, t in flat.items()}, folder=path)


def _open_gpt_pangu(path: Path, hint: ModelConfig | None) -> Source:
    return alpha.open_gpt_pangu(path, read_config_json(path), hint)


def _open_mindspore(path: Path, hint: ModelConfig | None) -> Source:
    return alpha.open_mindspore(_ckpt_file(path), hint)


LAYOUTS: tuple[Layout, ...] = (
    Layout(FORMAT, "our folder: config.json (format pangu-fn) + safetensors",
           _folder_config(lambda d: d.get("format") == FORMAT), _open_ours),
    Layout("hf", "Hugging Face GPT-2 / LLaMA / openPangu-Embedded folder (config.json + safetensors or .bin)",
           _folder_config(hf.is_hf_config), _open_hf),
    Layout("gpt_pangu", "Hugging Face PanGu-α port folder (model_type gpt_pangu)",
           _folder_config(alpha.is_gpt_pangu), _open_gpt_pangu),
    Layout("mindspore", "MindSpore .ckpt of PanGu-α (a file, or a folder holding one)", _is_ckpt, _open_mindspore),
    Layout("megatron", "PanGu-α Megatron GPU port .pt (model_optim_rng.pt)", lambda p: False,
           lambda p, h: torch_pt.open_pt(p, h, layout="megatron")),
    Layout("gguf", "GGUF file of llama.cpp (pangu-embedded, llama, gpt2)", gguf.is_gguf, gguf.open_gguf),
    Layout("pt", "PyTorch .pt/.pth/.bin state dict (seed PanguModel and similar; Megatron detected)",
           lambda p: p.is_file() and p.suffix in PT_SUFFIXES, torch_pt.open_pt),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def detect_layout(path: str | Path) -> Layout:
    """The first layout in `LAYOUTS` that recognises `path`; FormatError when none does."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: expected a model folder with config.json, found none")
    for layout in LAYOUTS:
        if layout.detect(path):
            return layout
    if path.is_dir():
        d = read_config_json(path)  # raises the precise error for a missing or bad config.json
        raise FormatError(f"{path}/config.json: unknown layout; expected format {FORMAT!r}, a Hugging Face "
                          f"model_type (gpt2, llama, PanguEmbedded) or gpt_pangu, found keys {sorted(d)[:8]} "
                          f"(model_type {d.get('model_type')!r})")
    raise FormatError(f"{path}: unknown checkpoint file; expected a MindSpore .ckpt, a GGUF .gguf or a PyTorch "
                      f"{'/'.join(PT_SUFFIXES)} file, found suffix {path.suffix!r}")


def config_hint(path: Path, explicit: ModelConfig | str | Path | None = None) -> ModelConfig | None:
    """What fills the gaps of layouts that store no config (MindSpore, .pt): `explicit` (a
    ModelConfig, a preset name, a config.json of ours / HF / gpt_pangu, or a mindformers run
    yaml), else a config.json beside the checkpoint file."""
    if isinstance(explicit, ModelConfig):
        return explicit
    if explicit is not None:
        from ..config import PRESETS

        if str(explicit) in PRESETS:
            return PRESETS[str(explicit)]
        f = Path(explicit)
        if f.is_file() and f.suffix in (".yaml", ".yml"):
            return alpha.read_mindformers_yaml(f)
        if f.is_file():
            return _config_from_json_dict(_read_json(f), f)
        if (f / "config.json").is_file():
            return _config_from_json_dict(read_config_json(f), f)
        raise ConfigError(f"config {str(explicit)!r}: expected a preset ({sorted(PRESETS)}) or a config.json")
    beside = (path.parent if path.is_file() else path) / "config.json"
    if beside.is_file() and path.is_file():
        return _config_from_json_dict(_read_json(beside), beside)
    return None


def _read_json(f: Path) -> dict[str, Any]:
    try:
        if f.stat().st_size > MAX_CONFIG:
            raise FormatError(f"{f}: {f.stat().st_size} bytes; expected a config.json of at most {MAX_CONFIG}")
        d = json.loads(f.read_text())
    except (ValueError, OSError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{f}: not valid JSON: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise FormatError(f"{f}: expected a JSON object, found {type(d).__name__}")
    return d


def _config_from_json_dict(d: dict[str, Any], where: Path) -> ModelConfig:
    if d.get("format") == FORMAT:
        return our_config(d, where)
    if alpha.is_gpt_pangu(d):
        return alpha.gpt_pangu_config(d)
    if hf.is_hf_config(d):
        return hf.config_from_hf(d, where=str(where))
    try:
        return ModelConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: not a config this reads (ours, gpt_pangu, gpt2, llama): {e}") from None


def open_source(path: str | Path, fmt: str | None = None,
                config: ModelConfig | str | Path | None = None) -> Source:
    """Open a checkpoint of any layout in `LAYOUTS` (detected, or forced with `fmt`) without
    reading its tensors (the HF and .pt layouts read them: they need the whole state dict to
    rename). `config` supplies what MindSpore/.pt files do not store (see `config_hint`)."""
    path = Path(path)
    if fmt is None:
        layout = detect_layout(path)
    else:
        by_name = {lay.name: lay for lay in LAYOUTS}
        if fmt not in by_name:
            raise ConfigError(f"unknown checkpoint format {fmt!r}; expected one of {list(by_name)}")
        layout = by_name[fmt]
        if not path.exists():
            raise FormatError(f"{path}: no such file or folder")
    return layout.open(path, config_hint(path, config))


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint in any layout `load` reads."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        d = read_config_json(path)
        if d.get("format") == FORMAT:
            return our_config(d, path / "config.json")
        if hf.is_hf_config(d):
            return hf.config_from_hf(d, where=str(path / "config.json"))
    return open_source(path).cfg


def load(path: str | Path, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, fmt: str | None = None,
         config: ModelConfig | str | Path | None = None) -> tuple[Params, ModelConfig]:
    """(params, cfg) from a checkpoint in any layout of `LAYOUTS` (detected, or `fmt`).
    Tensors are moved to `device` and, if given, cast to `dtype`. `config` (a ModelConfig, a
    preset name or a config.json) supplies the head count etc. for layouts storing no config.
    Raises FormatError for unreadable files and ShapeError for tensors that disagree with the
    config."""
    source = open_source(path, fmt, config)
    return materialise(source, device, dtype)


def materialise(source: Source, device: str | torch.device | None = None,
                dtype: str | torch.dtype | None = None) -> tuple[Params, ModelConfig]:
    """Read every tensor of `source` into a validated params tree. Without quantized leaves each
    tensor is cast, moved and laid out for decoding as it is read, so the peak memory is the
    loaded model plus one tensor (not two copies of the model)."""
    if not source.leaves:
        params = unflatten(_placed(source, device or "cpu", dtype))
        validate(params, source.cfg)
        return params, source.cfg
    flat = leaves.decode(source.tensors, source.leaves, str(source.path), read=lambda ref: ref.read().contiguous())
    leaves.check_no_stray_parts(flat, str(source.path))
    params = unflatten(flat)
    validate(params, source.cfg)
    if dtype is not None:
        params = astype(params, parse_dtype(dtype))
    params = to_device(params, device or "cpu")  # also lays weights out for decoding there
    return params, source.cfg


def _placed(source: Source, device: str | torch.device, dtype: str | torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of `source` by flat name, cast to `dtype` (floating ones), on `device`, in
    `params.decode_layout`'s layout, each finished before the next is read."""
    dtype = None if dtype is None else parse_dtype(dtype)
    tied = "lm_head.weight" not in source.tensors
    out = {}
    for name, ref in source.tensors.items():
        want = dtype if dtype is not None and ref.dtype.is_floating_point else ref.dtype
        if (want == torch.float32 and torch.device(device).type == "cpu" and ref.read_rows is not None
                and len(ref.shape) == 2 and is_matmul_weight(name, tied) and column_major_fp32()):
            out[name] = _column_major(ref)
            continue
        t = ref.read()
        out[name] = laid_out(name, t.to(device=device, dtype=want), tied)
    return out


def _column_major(ref: TensorRef) -> torch.Tensor:
    """The fp32 matrix of `ref` stored column-major (`decode_layout`'s CPU fp32 layout), filled
    from row slabs of about `CHUNK_BYTES`: no whole row-major copy is ever held."""
    n, k = ref.shape
    buf = torch.empty(k, n)
    step = max(1, CHUNK_BYTES // (4 * max(k, 1)))
    for a in range(0, n, step):
        b = min(a + step, n)
        buf[:, a:b] = ref.read_rows(a, b).t()
    return buf.t()


def source_of(params: Params, cfg: ModelConfig, path: Path | None = None) -> Source:
    """An in-memory tree as a Source (quantized leaves encoded as their tensors)."""
    validate(params, cfg)
    tensors, described = leaves.encode(flatten(params))
    refs = {name: TensorRef.of(t.detach()) for name, t in tensors.items()}
    return Source(path or Path("<memory>"), FORMAT, cfg, refs, leaves=described)


def save(path: str | Path, params: Params, cfg: ModelConfig, shard_size: int = DEFAULT_SHARD_SIZE,
         extra_files: dict[str, bytes] | None = None, *, overwrite: bool = False) -> Path:
    """Write params and config to the folder `path` atomically (a temporary folder renamed
    into place). Tensors are split into shards of at most `shard_size` bytes (a single
    larger tensor gets a shard of its own). `extra_files` (name -> bytes) are copied in,
    e.g. a tokenizer. Returns the path. An existing `path` other than an empty folder is
    replaced only with `overwrite=True`, and only when it is a model folder or bundle
    (ConfigError otherwise; see `destination.check_destination`)."""
    from .writers import write_ours

    return write_ours(source_of(params, cfg), path, shard_size=shard_size, extra_files=extra_files,
                      overwrite=overwrite)


def our_config(d: dict[str, Any], where: Path) -> ModelConfig:
    """The ModelConfig of our config.json dict `d` (read from `where`). Raises FormatError for
    a newer or malformed format version or a missing config object, ConfigError (naming the
    file and the key) for a config that ModelConfig refuses."""
    version = d.get("version")
    if type(version) is not int or version < 1:
        raise FormatError(f"{where}: expected an integer format version >= 1, found {repr(version)[:40]}")
    if version > VERSION:
        raise FormatError(f"{where}: format version {version} is newer than this pangu-fn reads ({VERSION}); "
                          "upgrade pangu-fn")
    if not isinstance(d.get("config"), dict):
        raise FormatError(f"{where}: expected a 'config' object, found {type(d.get('config')).__name__}")
    try:
        return ModelConfig.from_dict(d["config"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
