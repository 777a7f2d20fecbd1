"""Graph clean-ups for ONNX Runtime, run after onnxscript's fusions (target ort only).

Generic rewrites keyed on ops (no knowledge of the model):

- `group_query_attention`: a MultiHeadAttention whose key / value are cache writes
  `ScatterElements(Pad(past), positions, new)` becomes one GroupQueryAttention over the new
  keys / values and the past. Its semantics are the graph's: row b's new tokens take the
  slots from its first position on (`seqlens_k = last position`) and see every slot up to
  their own position, which is all the positional mask said; `present` is `past + new` as
  before, or, when the caller binds `present` to the `past` buffer (a `[B, H, max_len, D]`
  buffer), the new entries are written into it in place and nothing is copied.
  `total_sequence_length` is the graph input `attention_mask`'s length (past + new).
  ONNX Runtime's CPU kernel takes more than one new token after a past only for batch 1.
- `bnsh_attention_kv`: MultiHeadAttention accepts key / value as `[B, N, S, H]`; the fusion
  feeds them as `Reshape(Transpose(cache, [0, 2, 1, 3]))`, which copies the whole cache every
  call. The cache tensor is fed directly instead.
- `uniform_kv_concat`: the cache write `ScatterElements(Pad(past), positions, new)` copies the
  past twice (the pad, then the scatter's out-of-place copy). When every row's first new
  position is the past length (batch 1, equal-length rows) the result is `Concat(past, new)`,
  one copy; an `If` takes that branch and keeps the scatter for ragged rows.
- `merge_parallel_matmuls`: MatMul (or MatMulNBits) nodes that read the same activations with
  constant weights (attention's q, k, v; SwiGLU's gate, up) become one node over the weights
  concatenated along N, followed by a Split (and one Add for their constant biases): one
  larger matrix-vector product instead of several small ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import onnx_ir as ir

MSFT = "com.microsoft"


def optimize(model: ir.Model) -> dict[str, int]:
    """Apply the rewrites in place; returns how often each fired."""
    counts = {"group_query_attention": group_query_attention(model.graph),
              "bnsh_attention_kv": bnsh_attention_kv(model.graph),
              "uniform_kv_concat": uniform_kv_concat(model.graph),
              "merge_parallel_matmuls": merge_parallel_matmuls(model.graph)}
    return {k: v for k, v in counts.items() if v}


def group_query_attention(graph: ir.Graph) -> int:
    mask = next((v for v in graph.inputs if v.name == "attention_mask"), None)
    if mask is None:
        return 0
    lengths: dict[int, tuple[ir.Value, ir.Value]] = {}  # per position index: seqlens_k, total
    fired = 0
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != MSFT:
            continue
        ins = list(node.inputs) + [None] * (8 - len(node.inputs))
        if len(node.inputs) > 8 or any(v is not None for v in (ins[3], ins[4], ins[6], ins[7])):
            continue  # a packed bias, a key padding mask or MHA's own past: not our pattern
        caches = [None if v is None else _repeated_source(_bnsh_source(v) or v) for v in ins[1:3]]
        writes = [None if v is None or v.producer() is None else _padded_scatter(v.producer()) for v in caches]
        if any(w is None for w in writes) or writes[0][2] is not writes[1][2]:
            continue
        if not all(v.is_graph_output() for v in caches):
            continue
        past_k, past_v = writes[0][1], writes[1][1]
        kv_heads = past_k.shape[1] if past_k.shape is not None and len(past_k.shape) == 4 else None
        if not isinstance(kv_heads, int):
            continue
        index = writes[0][2]
        if id(index) not in lengths:
            lengths[id(index)] = _gqa_lengths(graph, node, index, mask, f"gqa_lengths{len(lengths)}")
        seqlens, total = lengths[id(index)]
        new_k, new_v = (_bsd(graph, node, w[3]) for w in writes)
        attrs = {"num_heads": node.attributes["num_heads"], "kv_num_heads": ir.AttrInt64("kv_num_heads", kv_heads)}
        if "scale" in node.attributes:
            attrs["scale"] = node.attributes["scale"]
        gqa = ir.Node(MSFT, "GroupQueryAttention", [ins[0], new_k, new_v, past_k, past_v, seqlens, total],
                      attrs, num_outputs=3, name=f"{node.name}_gqa")
        graph.insert_before(node, gqa)
        for old, new in zip([node.outputs[0], *caches], gqa.outputs):
            name, type_, shape = old.name, old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = f"{name}_replaced"
            new.name, new.type, new.shape = name, type_, shape
        graph.remove(node, safe=True)
        fired += 1
    if fired:
        _remove_unused(graph)
    return fired


def _repeated_source(value: ir.Value) -> ir.Value:
    """X when `value` repeats X's heads for grouped-query attention,
    `Reshape(Expand(Unsqueeze(X, 2)))` (SDPA's `enable_gqa`); else `value`."""
    reshape = _made_by(value, "Reshape")
    expand = _made_by(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = _made_by(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is None or len(unsqueeze.inputs) < 2 or unsqueeze.inputs[1] is None:
        return value
    axes = unsqueeze.inputs[1].const_value
    if axes is None or axes.numpy().reshape(-1).tolist() != [2]:
        return value
    return unsqueeze.inputs[0]


def _made_by(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node computing `value` when it is a standard-domain `op_type`, else None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and not node.domain else None


def _gqa_lengths(graph: ir.Graph, before: ir.Node, index: ir.Value, mask: ir.Value,
                 tag: str) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's `seqlens_k [B]` (each row's last new position, from the scatter's
    `index [B, H, T, D]`) and `total_sequence_length` (attention_mask's length), as int32."""
    def const(x: Any) -> ir.Value:
        return _initializer(graph, np.array(x, np.int64), f"{tag}_const{len(graph.initializers)}")

    last = ir.Node("", "Gather", [index, const(-1)], {"axis": ir.AttrInt64("axis", 2)})  # [B, H, D]
    row = ir.Node("", "Gather", [last.outputs[0], const(0)], {"axis": ir.AttrInt64("axis", 2)})  # [B, H]
    col = ir.Node("", "Gather", [row.outputs[0], const(0)], {"axis": ir.AttrInt64("axis", 1)})  # [B]
    seqlens = ir.Node("", "Cast", [col.outputs[0]], {"to": ir.AttrInt64("to", ir.DataType.INT32)})
    width = ir.Node("", "Shape", [mask], {"start": ir.AttrInt64("start", 1), "end": ir.AttrInt64("end", 2)})
    scalar = ir.Node("", "Squeeze", [width.outputs[0], const([0])])
    total = ir.Node("", "Cast", [scalar.outputs[0]], {"to": ir.AttrInt64("to", ir.DataType.INT32)})
    nodes = [last, row, col, seqlens, width, scalar, total]
    for i, n in enumerate(nodes):
        n.outputs[0].name = f"{tag}_{i}"
    graph.insert_before(before, nodes)
    return seqlens.outputs[0], total.outputs[0]


def _bsd(graph: ir.Graph, before: ir.Node, new: ir.Value) -> ir.Value:
    """`new [B, H, T, D]` as `[B, T, H*D]`: the projection it was reshaped from when there is
    one (`Transpose(Reshape(x), [0, 2, 1, 3])`), else a Transpose and a Reshape."""
    transpose = _made_by(new, "Transpose")
    if transpose is not None and list(transpose.attributes["perm"].as_ints()) == [0, 2, 1, 3]:
        reshape = _made_by(transpose.inputs[0], "Reshape")
        source = reshape.inputs[0] if reshape is not None else None
        if source is not None and source.shape is not None and len(source.shape) == 3:
            return source
    back = ir.Node("", "Transpose", [new], {"perm": ir.AttrInt64s("perm", [0, 2, 1, 3])})
    flat = ir.Node("", "Reshape", [back.outputs[0], _initializer(graph, np.array([0, 0, -1], np.int64),
                                                                  f"{new.name}_bsd_shape")])
    graph.insert_before(before, [back, flat])
    return flat.outputs[0]


def bnsh_attention_kv(graph: ir.Graph) -> int:
    fired = 0
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != MSFT:
            continue
        for index in (1, 2):  # key, value
            if index >= len(node.inputs) or node.inputs[index] is None:
                continue
            source = _bnsh_source(node.inputs[index])
            if source is not None:
                node.replace_input_with(index, source)
                fired += 1
    if fired:
        _remove_unused(graph)
    return fired


def _bnsh_source(value: ir.Value) -> ir.Value | None:
    """X when `value` is Reshape(Transpose(X, perm=[0, 2, 1, 3]), [*, *, N*H]) with X 4-D."""
    reshape = _made_by(value, "Reshape")
    transpose = _made_by(reshape.inputs[0], "Transpose") if reshape else None
    if transpose is None:
        return None
    perm = transpose.attributes.get("perm")
    source = transpose.inputs[0]
    if perm is None or list(perm.as_ints()) != [0, 2, 1, 3] or source is None:
        return None
    if source.shape is not None and len(source.shape) != 4:
        return None
    return source


def uniform_kv_concat(graph: ir.Graph) -> int:
    conditions: dict[int, ir.Value] = {}
    fired = 0
    for node in list(graph):
        write = _padded_scatter(node)
        if write is None:
            continue
        pad, past, index, new = write
        if id(index) not in conditions:
            conditions[id(index)] = _all_rows_at_end(graph, node, index, past)
        out = node.outputs[0]
        then_cat = ir.Node("", "Concat", [past, new], {"axis": ir.AttrInt64("axis", 2)})
        padded = ir.Node("", "Pad", list(pad.inputs), dict(pad.attributes))
        padded.outputs[0].name = f"{out.name}_padded"
        scatter = ir.Node("", "ScatterElements", [padded.outputs[0], index, new], dict(node.attributes))
        branches = {}
        for name, nodes in (("then_branch", [then_cat]), ("else_branch", [padded, scatter])):
            result = nodes[-1].outputs[0]
            result.name, result.type, result.shape = f"{out.name}_{name}", out.type, out.shape
            branches[name] = ir.AttrGraph(name, ir.Graph([], [result], nodes=nodes, name=f"{out.name}_{name}"))
        choose = ir.Node("", "If", [conditions[id(index)]], branches, name=f"{node.name}_uniform")
        graph.insert_before(node, choose)
        name = out.name
        out.replace_all_uses_with(choose.outputs[0], replace_graph_outputs=True)
        graph.remove([node, pad], safe=True)
        choose.outputs[0].name, choose.outputs[0].type, choose.outputs[0].shape = name, out.type, out.shape
        fired += 1
    return fired


def _padded_scatter(node: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value, ir.Value] | None:
    """(pad, past, index, new) for `ScatterElements(Pad(past), index, new, axis=2)` where past is
    a graph input and the pad feeds only this scatter."""
    if node.op_type != "ScatterElements" or node.domain or len(node.inputs) != 3:
        return None
    axis = node.attributes.get("axis")
    reduction = node.attributes.get("reduction")
    if axis is None or axis.value != 2 or (reduction is not None and reduction.value != "none"):
        return None
    data, index, new = node.inputs
    pad = data.producer() if data is not None else None
    if pad is None or pad.op_type != "Pad" or pad.domain or len(data.uses()) != 1:
        return None
    past = pad.inputs[0]
    if past is None or not past.is_graph_input():
        return None
    return pad, past, index, new


def _all_rows_at_end(graph: ir.Graph, before: ir.Node, index: ir.Value, past: ir.Value) -> ir.Value:
    """A bool scalar: every row's first new position (`index[:, 0, 0, 0]`) is the past length."""
    def const(x: int) -> ir.Value:
        return _initializer(graph, np.array(x, np.int64), f"{past.name}_uniform_{len(graph.initializers)}")

    nodes = [ir.Node("", "Gather", [index, const(0)], {"axis": ir.AttrInt64("axis", 3)})]
    for axis in (2, 1):
        nodes.append(ir.Node("", "Gather", [nodes[-1].outputs[0], const(0)], {"axis": ir.AttrInt64("axis", axis)}))
    nodes.append(ir.Node("", "Shape", [past], {"start": ir.AttrInt64("start", 2), "end": ir.AttrInt64("end", 3)}))
    nodes.append(ir.Node("", "Equal", [nodes[2].outputs[0], nodes[3].outputs[0]]))
    nodes.append(ir.Node("", "Cast", [nodes[-1].outputs[0]], {"to": ir.AttrInt64("to", ir.DataType.INT32)}))
    nodes.append(ir.Node("", "ReduceMin", [nodes[-1].outputs[0]], {"keepdims": ir.AttrInt64("keepdims", 0)}))
    nodes.append(ir.Node("", "Cast", [nodes[-1].outputs[0]], {"to": ir.AttrInt64("to", ir.DataType.BOOL)}))
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"{past.name}_all_at_end_{i}"
    graph.insert_before(before, nodes)
    return nodes[-1].outputs[0]


def merge_parallel_matmuls(graph: ir.Graph) -> int:
    groups: dict[tuple, list[ir.Node]] = defaultdict(list)
    for node in graph:
        key = _matmul_key(node)
        if key is not None:
            groups[key].append(node)
    fired = 0
    for nodes in groups.values():
        if len(nodes) > 1:
            _merge(graph, nodes)
            fired += 1
    if fired:
        _remove_unused(graph)
    return fired


def _matmul_key(node: ir.Node) -> tuple | None:
    """A grouping key for a MatMul / MatMulNBits with a constant weight, or None."""
    if node.op_type == "MatMul" and not node.domain:
        w = node.inputs[1]
        if w is None or w.const_value is None or len(w.const_value.shape) != 2:
            return None
        return ("MatMul", id(node.inputs[0]), w.const_value.shape[0], w.const_value.dtype)
    if node.op_type == "MatMulNBits" and node.domain == MSFT:
        ins = list(node.inputs) + [None] * (6 - len(node.inputs))
        if any(v is not None and v.const_value is None for v in ins[1:4]) or any(v is not None for v in ins[4:]):
            return None
        attrs = tuple(sorted((k, a.value) for k, a in node.attributes.items() if k != "N"))
        return ("MatMulNBits", id(ins[0]), attrs, ins[3] is None)
    return None


def _merge(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    first = nodes[0]
    biases = [_const_bias(n) for n in nodes]
    if not all(b is not None for b in biases):
        biases = []
    if first.op_type == "MatMul":
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        widths = [w.shape[1] for w in weights]
        merged_w = _initializer(graph, np.concatenate(weights, axis=1), f"{first.name}_merged_weight")
        merged = ir.Node("", "MatMul", [first.inputs[0], merged_w], name=f"{first.name}_merged")
    else:
        parts = [[n.inputs[i].const_value.numpy() for n in nodes] for i in (1, 2)]
        widths = [int(n.attributes["N"].value) for n in nodes]
        blocks = parts[0][0].shape[1]
        scales = [s.reshape(w, blocks) for s, w in zip(parts[1], widths)]
        inputs = [first.inputs[0], _initializer(graph, np.concatenate(parts[0]), f"{first.name}_merged_qdata"),
                  _initializer(graph, np.concatenate(scales).reshape(-1), f"{first.name}_merged_scales")]
        if len(first.inputs) > 3 and first.inputs[3] is not None:
            zps = [n.inputs[3].const_value.numpy().reshape(w, -1) for n, w in zip(nodes, widths)]
            inputs.append(_initializer(graph, np.concatenate(zps), f"{first.name}_merged_zero_points"))
        attrs = {k: a for k, a in first.attributes.items() if k != "N"}
        attrs["N"] = ir.AttrInt64("N", sum(widths))
        merged = ir.Node(MSFT, "MatMulNBits", inputs, attrs, name=f"{first.name}_merged")
    out = merged.outputs[0]
    new_nodes = [merged]
    if biases:
        bias = _initializer(graph, np.concatenate([b.const_value.numpy() for _, b in biases]), f"{first.name}_merged_bias")
        add = ir.Node("", "Add", [out, bias], name=f"{first.name}_merged_bias_add")
        new_nodes.append(add)
        out = add.outputs[0]
    sizes = _initializer(graph, np.array(widths, np.int64), f"{first.name}_merged_split")
    split = ir.Node("", "Split", [out, sizes], {"axis": ir.AttrInt64("axis", -1)}, num_outputs=len(nodes),
                    name=f"{first.name}_merged_split")
    new_nodes.append(split)
    graph.insert_before(first, new_nodes)
    for i, node in enumerate(nodes):
        old = biases[i][0].outputs[0] if biases else node.outputs[0]
        split.outputs[i].name = old.name + "_merged"
        old.replace_all_uses_with(split.outputs[i], replace_graph_outputs=True)


def _const_bias(node: ir.Node) -> tuple[ir.Node, ir.Value] | None:
    """(Add node, bias) when the node's only consumer adds a constant 1-D bias."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or other.const_value is None or len(other.const_value.shape) != 1:
        return None
    return add, other


def _initializer(graph: ir.Graph, array: np.ndarray, name: str) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _remove_unused(graph: ir.Graph) -> None:
    """Drop nodes (last to first) whose outputs nothing uses, then unused initializers."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if all(not v.uses() and not v.is_graph_output() for v in node.outputs):
                graph.remove(node, safe=True)
                changed = True
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]
