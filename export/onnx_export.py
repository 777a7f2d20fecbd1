"""Lower `pangu_fn.forward` to one ONNX decoder graph with explicit KV inputs and outputs.

`export_onnx` traces a wrapper of `forward` (see `graph.py`) with
`torch.onnx.export(dynamo=True)`, names the inputs and outputs as optimum does, lowers the
quantized custom ops (`quant_ops.py`), optionally applies onnxscript's ONNX Runtime fusions,
and saves the model (weights as external data past 2 GB).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pangu_fn.cache import compute_dtype
from pangu_fn.config import ModelConfig
from pangu_fn.errors import ConfigError
from pangu_fn.params import Params, layer_sizes

from .graph import GrowingDecoder, StaticDecoder
from .quant_ops import translation_table

DEFAULT_OPSET = 18
TWO_GB = 2**31
KEY, VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"


@dataclass
class OnnxGraph:
    """What `export_onnx` wrote: files (relative to the folder), I/O names and the opset."""

    files: list[str]
    inputs: list[str]
    outputs: list[str]
    opset: int
    layout: str
    kv_heads: list[int]
    fusions: dict[str, int] = field(default_factory=dict)


def kv_names(n_blocks: int, past: bool) -> list[str]:
    k, v = (KEY, VALUE) if past else (PRESENT_KEY, PRESENT_VALUE)
    return [name.format(i) for i in range(n_blocks) for name in (k, v)]


def kv_heads(params: Params, cfg: ModelConfig) -> list[int]:
    """KV heads of every cached block, from the parameter shapes."""
    blocks = list(params["blocks"]) + ([params["query_layer"]] if cfg.query_layer else [])
    return [layer_sizes(b, cfg).num_kv_heads for b in blocks]


def export_onnx(params: Params, cfg: ModelConfig, path: Path, *, layout: str = "growing",
                opset: int = DEFAULT_OPSET, batch_size: int = 1, kv_len: int = 0,
                ort_fusions: bool = True, accuracy_level: int = 0) -> OnnxGraph:
    """Write `path` (model.onnx, plus `model.onnx.data` past 2 GB).

    layout "growing" (target ort): dynamic batch, sequence and past length; inputs
    `input_ids, attention_mask, position_ids, past_key_values.N.key/value`, outputs `logits,
    present.N.key/value` (past + new). layout "static" (target ascend): fixed `batch_size`
    and `kv_len`, dynamic sequence only; inputs `input_ids, position_ids,
    past_key_values.N.*` (the whole buffer), outputs `logits, present.N.*` holding only the
    new tokens' keys and values; no contrib ops. Raises ConfigError for bad options."""
    if not 14 <= opset <= 23:
        raise ConfigError(f"export: expected an opset in 14..23, found {opset}")
    heads = kv_heads(params, cfg)
    dtype = compute_dtype(params)
    n = len(heads)
    B, T, D = 2, 3, cfg.head_dim
    seq = torch.export.Dim("sequence_length", min=1, max=cfg.max_seq_len)
    if layout == "growing":
        P = 4
        module: torch.nn.Module = GrowingDecoder(params, cfg)
        batch = torch.export.Dim("batch_size", min=1, max=1024)
        past_len = torch.export.Dim("past_sequence_length", min=0, max=cfg.max_seq_len)
        args: tuple[Any, ...] = (
            torch.zeros(B, T, dtype=torch.int64), torch.ones(B, P + T, dtype=torch.int64),
            (P + torch.arange(T)).expand(B, T).contiguous(),
            *[torch.zeros(B, h, P, D, dtype=dtype) for h in heads for _ in (0, 1)])
        shapes: tuple[Any, ...] = ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim("total_sequence_length")},
                                   {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in range(2 * n)))
        inputs = ["input_ids", "attention_mask", "position_ids", *kv_names(n, past=True)]
    elif layout == "static":
        if kv_len < 2 or batch_size < 1:
            raise ConfigError(f"export: the static layout needs kv_len >= 2 and batch >= 1, "
                              f"found kv_len {kv_len}, batch {batch_size}")
        B, T = batch_size, 2
        seq = torch.export.Dim("sequence_length", min=1, max=kv_len)
        module = StaticDecoder(params, cfg)
        args = (torch.zeros(B, T, dtype=torch.int64), torch.arange(T).expand(B, T).contiguous(),
                *[torch.zeros(B, h, kv_len, D, dtype=dtype) for h in heads for _ in (0, 1)])
        shapes = ({1: seq}, {1: seq}, tuple({} for _ in range(2 * n)))
        inputs = ["input_ids", "position_ids", *kv_names(n, past=True)]
        ort_fusions = False
    else:
        raise ConfigError(f"export: unknown layout {layout!r}; expected 'growing' or 'static'")
    outputs = ["logits", *kv_names(n, past=False)]

    table = translation_table(opset, contrib_ops=layout == "growing", accuracy_level=accuracy_level)
    with _quiet():
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=opset,
                                    dynamic_shapes=shapes, input_names=inputs, output_names=outputs,
                                    custom_translation_table=table or None, optimize=True, verbose=False)
    fusions: dict[str, int] = {}
    if ort_fusions:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        from .ort_passes import optimize

        with _quiet():
            _, fusions = optimize_for_ort(program.model)
        fusions = {**{k: v for k, v in fusions.items() if v}, **optimize(program.model)}
    if program.model.opset_imports.get("", opset) > opset:
        raise ConfigError(f"export: the graph needs opset {program.model.opset_imports['']}, above --opset {opset}")
    size = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    external = size > TWO_GB - 2**26
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=external)
    files = [path.name] + ([path.name + ".data"] if external else [])
    return OnnxGraph(files, inputs, outputs, opset, layout, heads, fusions)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and log lines (our tqdm bar reports)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
