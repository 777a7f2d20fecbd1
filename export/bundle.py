"""export_bundle: params tree -> bundle folder (manifest.json, model file(s), tokenizer).

The folder is written atomically (a temporary folder renamed into place), so a failed
export leaves nothing behind. The manifest format is the one `pangu_runtime` validates.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import onnx
import torch
from pangu_runtime.manifest import FORMAT, MANIFEST, VERSION, sha256_file
from tqdm import tqdm

import pangu_fn
from pangu_fn.cache import compute_dtype
from pangu_fn.config import ModelConfig
from pangu_fn.errors import ConfigError, FormatError
from pangu_fn.io.atomic import atomic_dir
from pangu_fn.io.destination import check_destination
from pangu_fn.params import Params, astype, parse_dtype
from pangu_fn.tokenizer import find_tokenizer, load_tokenizer
from pangu_fn.tree import flatten

from . import ascend
from .onnx_export import DEFAULT_OPSET, export_onnx, kv_heads
from .torch_export import export_pt2

TARGETS = ("ort", "ascend", "torch")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def export_bundle(params: Params, cfg: ModelConfig, out: str | Path, target: str = "ort", *,
                  dtype: str | torch.dtype | None = None, opset: int = DEFAULT_OPSET,
                  tokenizer: str | Path | None = None, batch_size: int = 1, kv_len: int | None = None,
                  prefill_lengths: list[int] | None = None, soc_version: str = ascend.DEFAULT_SOC,
                  ort_fusions: bool = True, accuracy_level: int = 0, genai: bool = True,
                  max_new_tokens: int = 128, progress: bool = True, overwrite: bool = False,
                  sources: list[str | Path] | tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Write a bundle for `target` ("ort" | "ascend" | "torch") to the folder `out` and return
    its manifest. `dtype` casts the tree first; `tokenizer` is a tokenizer file or a model
    folder holding one (copied into the bundle). Ascend options: fixed `batch_size`,
    `kv_len` (default min(1024, max_seq_len)), `prefill_lengths` (ATC profiles, default
    1, 16, 64, ...), `soc_version`; the ONNX file must pass `check_ascend` or nothing is
    written. `genai` (target ort) also writes onnxruntime-genai's `genai_config.json`.
    An existing `out` other than an empty folder is replaced only with `overwrite` and only
    when it is a bundle or model folder; `out` may never equal or contain one of `sources`
    (the model's files). Raises ConfigError for bad options or such a destination, FormatError
    for a graph that fails the checker."""
    if target not in TARGETS:
        raise ConfigError(f"export: unknown target {target!r}; expected one of {TARGETS}")
    check_destination(out, overwrite=overwrite, sources=sources)
    if dtype is not None:
        params = astype(params, parse_dtype(dtype))
    cdtype = compute_dtype(params)
    out = Path(out)
    steps = ["trace and lower", "tokenizer", "manifest"]
    bar = tqdm(total=len(steps), desc=f"export {target}", unit="step", file=sys.stderr, disable=not progress)
    with atomic_dir(out) as tmp:
        bar.set_postfix_str(steps[0])
        manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "target": target,
            "producer": {"pangu_fn": pangu_fn.__version__, "torch": torch.__version__.split("+")[0],
                         "onnx": onnx.__version__},
            "config": cfg.to_dict(),
            "quantization": quantization_summary(params, target),
        }
        heads = kv_heads(params, cfg)
        cache = {"blocks": len(heads), "kv_heads": heads, "head_dim": cfg.head_dim, "dtype": DTYPE_NAMES[cdtype],
                 "axes": ["batch", "kv_heads", "position", "head_dim"], "slot": "position"}
        if target == "torch":
            export_pt2(params, cfg, tmp / "model.pt2")
            manifest["model"] = {"file": "model.pt2", "format": "torch.export", "dtype": DTYPE_NAMES[cdtype]}
            manifest["inputs"] = ["tokens", "keys", "values", "lengths"]
            manifest["outputs"] = ["logits", "keys", "values", "lengths"]
            manifest["cache"] = {**cache, "layout": "inplace"}
        else:
            static = target == "ascend"
            if static:
                kv_len = kv_len or min(1024, cfg.max_seq_len)
                prefill_lengths = sorted(set(prefill_lengths or ascend.default_prefill_lengths(kv_len)))
                _check_profiles(prefill_lengths, kv_len, batch_size)
            graph = export_onnx(params, cfg, tmp / "model.onnx", layout="static" if static else "growing",
                                opset=opset, batch_size=batch_size, kv_len=kv_len or 0,
                                ort_fusions=ort_fusions and not static, accuracy_level=accuracy_level)
            manifest["model"] = {"file": "model.onnx", "external_data": graph.files[1:], "format": "onnx",
                                 "opset": graph.opset, "dtype": DTYPE_NAMES[cdtype], "ort_fusions": graph.fusions,
                                 "accuracy_level": accuracy_level}
            manifest["inputs"], manifest["outputs"] = graph.inputs, graph.outputs
            manifest["cache"] = {**cache, "layout": graph.layout, "past": "past_key_values.%d.key|value",
                                 "present": "present.%d.key|value",
                                 "share_buffer": graph.fusions.get("group_query_attention", 0) == len(heads)}
            if static:
                model = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
                problems = ascend.check_ascend(model)
                if problems:
                    raise FormatError("export: the Ascend graph fails the ATC checks:\n  "
                                      + "\n  ".join(map(str, problems)))
                manifest["cache"].update(batch_size=batch_size, max_len=kv_len)
                manifest["ascend"] = {"soc_version": soc_version, "batch_size": batch_size, "kv_len": kv_len,
                                      "prefill_lengths": prefill_lengths,
                                      "atc": ascend.atc_command(model, "model.onnx", prefill_lengths, soc_version)}
        bar.update()

        bar.set_postfix_str(steps[1])
        manifest["tokenizer"] = _copy_tokenizer(tokenizer, tmp) if tokenizer is not None else None
        manifest["generation"] = {
            "eos_token_ids": [cfg.eos_token_id] if cfg.eos_token_id is not None else [],
            "bos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id,
            "max_new_tokens": max_new_tokens, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "repetition_penalty": 1.0}
        if target == "ort" and genai:
            from .genai import write_genai_files

            manifest["genai"] = write_genai_files(tmp, cfg, manifest, max_new_tokens)
        bar.update()

        bar.set_postfix_str(steps[2])
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        bar.update()
    bar.close()
    return manifest


def quantization_summary(params: Params, target: str) -> dict[str, Any] | None:
    """Counts and schemes of the quantized leaves (None for a float tree), and how each kind
    is lowered for `target`."""
    kinds: dict[str, dict[str, Any]] = {}
    for leaf in flatten(params).values():
        if isinstance(leaf, torch.Tensor):
            continue
        entry = kinds.setdefault(leaf.kind, {"count": 0, "schemes": []})
        entry["count"] += 1
        if leaf.scheme not in entry["schemes"]:
            entry["schemes"].append(leaf.scheme)
    if not kinds:
        return None
    lowering = {"int8": "DequantizeLinear + MatMul", "dense": "MatMul",
                "int4": "dequantize (uint8 constant) + MatMul" if target == "ascend" else "com.microsoft MatMulNBits"}
    if target == "torch":
        lowering = {k: f"torch.ops.pangu.{k}_linear" for k in kinds}
    return {"leaves": kinds, "lowering": {k: lowering.get(k, "dequantize") for k in kinds}}


def _check_profiles(lengths: list[int], kv_len: int, batch_size: int) -> None:
    if batch_size < 1 or kv_len < 2:
        raise ConfigError(f"export: expected batch >= 1 and kv_len >= 2, found {batch_size} and {kv_len}")
    if not 2 <= len(lengths) <= 100 or lengths[0] != 1 or lengths[-1] > kv_len:
        raise ConfigError(f"export: expected 2..100 prefill lengths including 1 (decode), each <= kv_len "
                          f"{kv_len}, found {lengths}")


def _copy_tokenizer(source: str | Path, dest: Path) -> dict[str, Any]:
    """Copy the tokenizer (and its tokenizer_config.json) into the bundle; returns the
    manifest entry with its kind and special ids. Raises ConfigError when there is none."""
    source = Path(source)
    file = find_tokenizer(source) if source.is_dir() else source
    if file is None or not file.is_file():
        raise ConfigError(f"export: no tokenizer at {source}; expected tokenizer.model, vocab.model or tokenizer.json")
    tok = load_tokenizer(file)
    shutil.copyfile(file, dest / file.name)
    extra = []
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        shutil.copyfile(config, dest / config.name)
        extra.append(config.name)
    kind = {"vocab.model": "pangu-alpha"}.get(file.name, "sentencepiece" if file.suffix == ".model" else "tokenizers")
    return {"file": file.name, "kind": kind, "extra_files": extra, "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
