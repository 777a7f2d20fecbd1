"""The Ascend (ATC) profile: our static export passes the checker and runs like `forward`;
hand-made graphs with each forbidden feature are rejected, one test per rule. (There is no
Ascend hardware here: the checker is the proof.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import random_model
from onnx import TensorProto, helper, numpy_helper
from pangu_export import check_ascend, export_bundle
from pangu_runtime import Session
from test_export import ort_bundle, shared_dir  # noqa: F401  (shared_dir is a fixture)

import pangu_fn as pf

PROMPTS = [[5, 17, 42, 9, 5, 17, 42, 9, 5], [3, 88]]


@pytest.fixture(scope="module")
def ascend_bundle(tmp_path_factory):
    params, cfg = random_model("tiny-openpangu")
    path = tmp_path_factory.mktemp("ascend") / "bundle"
    manifest = export_bundle(params, cfg, path, "ascend", batch_size=2, kv_len=96, prefill_lengths=[1, 4, 16],
                             progress=False)
    return path, manifest, params, cfg


def test_ascend_export_passes_the_checker(ascend_bundle):
    path, manifest, _, cfg = ascend_bundle
    assert check_ascend(path / "model.onnx") == []
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) <= 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["input_ids"] == [2, "sequence_length"] and "attention_mask" not in dims
    assert dims["past_key_values.0.key"] == [2, cfg.num_kv_heads, 96, cfg.head_dim]  # the static buffer
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert outs["present.0.key"] == [2, cfg.num_kv_heads, "sequence_length", cfg.head_dim]  # only the new entries
    atc = manifest["ascend"]["atc"]
    for flag in ("--framework=5", "--soc_version=Ascend310B1", "--input_format=ND",
                 '--dynamic_dims="1,1;4,4;16,16"', "input_ids:2,-1", "position_ids:2,-1",
                 f"past_key_values.0.key:2,{cfg.num_kv_heads},96,{cfg.head_dim}"):
        assert flag in atc


def test_ascend_bundle_generates_like_forward(ascend_bundle):
    path, _, params, cfg = ascend_bundle
    s = Session(path)
    want = pf.generate(params, cfg, PROMPTS, 24, eos_token_ids=())
    got = s.generate(PROMPTS, 24, eos_token_ids=())
    assert [c.tokens for c in got] == [c.tokens for c in want]
    one = s.generate(PROMPTS[:1], 8, eos_token_ids=())  # fewer prompts than the fixed batch
    assert one[0].tokens == want[0].tokens[:8]
    with torch.no_grad():
        for prompt, got_logits in zip(PROMPTS, s.logits(PROMPTS)):  # 9 tokens run as a 16-token profile
            ref, _ = pf.forward(params, cfg, torch.tensor([prompt]))
            assert np.abs(got_logits - ref[0].numpy()).max() <= 1e-4


def test_cli_check(ascend_bundle, tmp_path, capsys):
    from pangu_tools.cli import main

    assert main(["export", "--check", "ascend", str(ascend_bundle[0] / "model.onnx")]) == 0
    bad = tmp_path / "bad.onnx"
    onnx.save(graph_with(nodes=[helper.make_node("MatMulInteger", ["x8", "w8"], ["y"])],
                         inputs=[("x8", TensorProto.INT8, [1, 4])], inits={"w8": np.ones((4, 4), np.int8)},
                         out_type=TensorProto.INT32), bad)
    assert main(["export", "--check", "ascend", str(bad)]) == 1
    assert "[matmulinteger]" in capsys.readouterr().out
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert main(["export", "--check", "ascend", str(tmp_path / "junk.onnx")]) == 2


def graph_with(nodes, inputs=(("x", TensorProto.FLOAT, [1, 4]),), inits=None, out="y",
               out_type=TensorProto.FLOAT, out_shape=None, opset=18, extra_opsets=()):
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    init = [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()]
    g = helper.make_graph(nodes, "g", vis, [helper.make_tensor_value_info(out, out_type, out_shape)], init)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def rules(model) -> set[str]:
    return {p.rule for p in check_ascend(model)}


def test_clean_graph_passes():
    assert rules(graph_with([helper.make_node("Relu", ["x"], ["y"])], out_shape=[1, 4])) == set()


def test_rule_opset():
    assert "opset" in rules(graph_with([helper.make_node("Relu", ["x"], ["y"])], opset=19))


def test_rule_domain():
    node = helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")
    assert "domain" in rules(graph_with([node], extra_opsets=[helper.make_opsetid("com.microsoft", 1)]))


def test_rule_op_version():
    assert "op-version" in rules(graph_with([helper.make_node("Gelu", ["x"], ["y"])]))  # Gelu is opset 20


def test_rule_trilu_with_k():
    with_k = graph_with([helper.make_node("Trilu", ["x", "k"], ["y"], upper=0)], inputs=[("x", TensorProto.FLOAT, [4, 4])],
                        inits={"k": np.array(1, np.int64)})
    without = graph_with([helper.make_node("Trilu", ["x"], ["y"], upper=0)], inputs=[("x", TensorProto.FLOAT, [4, 4])])
    assert "trilu-k" in rules(with_k) and "trilu-k" not in rules(without)


def test_rule_cast_to_int8():
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.INT8)
    assert "cast-int8" in rules(graph_with([node], out_type=TensorProto.INT8))


def test_rule_matmulinteger():
    node = helper.make_node("MatMulInteger", ["x8", "w8"], ["y"])
    model = graph_with([node], inputs=[("x8", TensorProto.INT8, [1, 4])], inits={"w8": np.ones((4, 4), np.int8)},
                       out_type=TensorProto.INT32)
    assert "matmulinteger" in rules(model)


def test_rule_zero_length_input():
    assert "zero-dim" in rules(graph_with([helper.make_node("Relu", ["x"], ["y"])],
                                          inputs=[("x", TensorProto.FLOAT, [1, 0, 4])]))


def test_rule_zero_length_intermediate():
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["empty"]),
             helper.make_node("Concat", ["x", "empty"], ["y"], axis=1)]
    model = graph_with(nodes, inputs=[("x", TensorProto.FLOAT, [2, 4])],
                       inits={"s": np.array([0], np.int64), "e": np.array([0], np.int64), "a": np.array([1], np.int64)})
    assert "zero-dim" in rules(model)


def test_rule_too_many_dynamic_dims():
    model = graph_with([helper.make_node("Add", ["a", "b"], ["y"])],
                       inputs=[("a", TensorProto.FLOAT, ["n1", "n2", "n3"]), ("b", TensorProto.FLOAT, ["n1", "n2", "n3"])])
    assert "dynamic-dims" in rules(model)


def test_rule_growing_kv_input():
    model = graph_with([helper.make_node("Relu", ["past"], ["y"])],
                       inputs=[("past", TensorProto.FLOAT, [1, 2, "past_len", 8])])
    assert "kv-static" in rules(model)


def test_rule_whole_kv_buffer_output():
    nodes = [helper.make_node("Add", ["past", "new"], ["y"])]
    model = graph_with(nodes, inputs=[("past", TensorProto.FLOAT, [1, 2, 16, 8]), ("new", TensorProto.FLOAT, [1, 2, 16, 8])],
                       out_shape=[1, 2, 16, 8])
    assert "kv-new-only" in rules(model)


def test_growing_ort_export_fails_the_checker(shared_dir):  # noqa: F811
    """The ort graph (dynamic past, contrib fusions) is not an Ascend graph, and the checker says why."""
    path = ort_bundle(shared_dir, "tiny-gpt")
    assert {"kv-static", "domain"} <= rules(path / "model.onnx")
    assert "ascend" not in json.loads((path / "manifest.json").read_text())
