"""The Ascend (ATC) profile: the `atc` command for an exported graph, and a checker that
verifies an ONNX file against the constraints ATC imposes.

There is no Ascend hardware or CANN toolkit here: `check_ascend` is the proof that an
export fits, rule by rule (CANN 8.0 ATC documentation and the LLM ports cited in
docs/export.md):

- `opset`: the default-domain opset is at most 18 (the CANN ONNX parser registers v8..18).
- `domain`: every node is a standard ONNX op (no com.microsoft or other contrib domain).
- `op-version`: every op exists at the model's opset (checked against the ONNX schemas).
- `trilu-k`: no Trilu with a `k` input.
- `cast-int8`: no Cast to INT8.
- `matmulinteger`: no MatMulInteger.
- `zero-dim`: no tensor (input, output, initializer, inferred intermediate) has a zero-length
  dimension.
- `dynamic-dims`: at most 4 symbolic input dimensions (the `--dynamic_dims` limit), and every
  dimension is either a positive integer or a name.
- `kv-static`: KV-cache inputs (rank 4) are fully static: a fixed batch and KV length.
- `kv-new-only`: no KV output repeats a whole KV input buffer (only the new entries go out).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

MAX_OPSET = 18
MAX_DYNAMIC_DIMS = 4
DEFAULT_SOC = "Ascend310B1"
FORBIDDEN_OPS = {"MatMulInteger": "matmulinteger"}


@dataclass(frozen=True)
class Problem:
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.detail}"


def default_prefill_lengths(kv_len: int) -> list[int]:
    """1 (decode) and powers of 4 from 16 up to half the KV length: 3-4 profiles, as the
    ATC documentation recommends."""
    lengths = [1] + [n for n in (16, 64, 256, 1024) if n <= kv_len // 2]
    return lengths if len(lengths) >= 2 else [1, max(2, kv_len // 2)]


def atc_command(model: onnx.ModelProto, onnx_file: str, prefill_lengths: list[int],
                soc_version: str = DEFAULT_SOC, output: str = "model") -> str:
    """The `atc` line compiling `onnx_file`: `--input_shape` from the graph's inputs (symbolic
    dims as -1) and one `--dynamic_dims` profile per prefill length."""
    shapes, dynamic = [], 0
    for value in model.graph.input:
        dims = []
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(str(d.dim_value))
            else:
                dims.append("-1")
                dynamic += 1
        shapes.append(f"{value.name}:{','.join(dims)}")
    parts = ["atc", "--framework=5", f"--model={onnx_file}", f"--output={output}", "--input_format=ND",
             f"--input_shape=\"{';'.join(shapes)}\"", f"--soc_version={soc_version}",
             "--precision_mode=must_keep_origin_dtype"]
    if dynamic:
        parts.insert(6, "--dynamic_dims=\"" + ";".join(",".join([str(n)] * dynamic) for n in prefill_lengths) + "\"")
    return " ".join(parts)


def check_ascend(model: onnx.ModelProto | str | Path) -> list[Problem]:
    """Every ATC constraint `model` violates (empty when it fits). Loads a path without its
    external weights (shapes and ops are all that matter)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    problems: list[Problem] = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        problems.append(Problem("opset", "the model imports no default-domain opset"))
    elif opset > MAX_OPSET:
        problems.append(Problem("opset", f"default-domain opset {opset}; ATC parses opsets up to {MAX_OPSET}"))

    for node in _nodes(model.graph):
        where = f"node {node.name or '?'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem("domain", f"{where} is in domain {node.domain!r}; ATC takes standard ONNX ops only"))
            continue
        if opset is not None:
            try:
                onnx.defs.get_schema(node.op_type, min(opset, MAX_OPSET), "")
            except onnx.defs.SchemaError:
                problems.append(Problem("op-version", f"{where} does not exist at opset {min(opset, MAX_OPSET)}"))
        if node.op_type == "Trilu" and len(node.input) > 1 and node.input[1]:
            problems.append(Problem("trilu-k", f"{where} has a k input; rebuild it as a single-input Trilu"))
        if node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.INT8 for a in node.attribute):
            problems.append(Problem("cast-int8", f"{where} casts to INT8; ATC needs AscendQuant instead"))
        if node.op_type in FORBIDDEN_OPS:
            problems.append(Problem(FORBIDDEN_OPS[node.op_type], f"{where} is not parsed by ATC without a plugin"))

    problems += _shape_problems(model)
    return problems


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those in If / Loop / Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(sub)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _shape_problems(model: onnx.ModelProto) -> list[Problem]:
    problems = []
    inputs = {v.name: _dims(v) for v in model.graph.input}
    symbolic = 0
    for name, dims in inputs.items():
        for axis, d in enumerate(dims):
            if d is None:
                problems.append(Problem("dynamic-dims", f"input {name} axis {axis} has no size or name; "
                                        "ATC's --input_shape needs every dimension"))
            elif isinstance(d, str):
                symbolic += 1
        if len(dims) == 4 and any(not isinstance(d, int) for d in dims):
            problems.append(Problem("kv-static", f"KV input {name} has shape {dims}; a growing cache "
                                    "forces ATC's dynamic path: use a fixed batch and KV length"))
    if symbolic > MAX_DYNAMIC_DIMS:
        problems.append(Problem("dynamic-dims", f"{symbolic} symbolic input dimensions; --dynamic_dims "
                                f"allows at most {MAX_DYNAMIC_DIMS}"))
    kv_shapes = {tuple(d) for d in inputs.values() if len(d) == 4 and all(isinstance(x, int) for x in d)}
    for out in model.graph.output:
        if len(_dims(out)) == 4 and tuple(_dims(out)) in kv_shapes:
            problems.append(Problem("kv-new-only", f"output {out.name} {_dims(out)} returns a whole KV "
                                    "buffer; return only the new entries"))

    for init in model.graph.initializer:
        if 0 in init.dims:
            problems.append(Problem("zero-dim", f"initializer {init.name} has shape {list(init.dims)}"))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # noqa: BLE001  (onnx raises InferenceError and others)
        problems.append(Problem("zero-dim", f"shape inference failed, so empty tensors cannot be ruled out: {e}"))
        return problems
    seen = set()
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.name not in seen and 0 in _dims(v):
            seen.add(v.name)
            problems.append(Problem("zero-dim", f"tensor {v.name} has shape {_dims(v)}; ATC rejects "
                                    "zero-length dimensions"))
    return problems
