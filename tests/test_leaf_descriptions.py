"""A quantized leaf read from a file (its tensors and its description in config.json) is
either rebuilt exactly or refused with FormatError: wrong types, wrong dtypes or shapes,
a description that disagrees with the tensors. Random mutations of valid descriptions never
raise anything else."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pangu_fn.errors import FormatError
from pangu_fn.io.leaves import decode, encode
from pangu_fn.quant import DenseWeight, Int4Weight, Int8Weight, quantize_int4, quantize_int8

GEN = torch.Generator().manual_seed(0)
W = torch.randn(32, 64, generator=GEN)
LEAVES = {"int8": quantize_int8(W, torch.bfloat16), "int4": quantize_int4(W, 32, False, torch.bfloat16),
          "int4-sym": quantize_int4(W, 32, True, torch.float32), "dense": DenseWeight(W.bfloat16(), keep_dense=True)}


def stored(leaf) -> tuple[dict, dict]:
    """(tensors by suffix, description) as a checkpoint holds them."""
    return dict(leaf.to_tensors()), {"kind": leaf.kind, **leaf.describe()}


def same(a, b) -> bool:
    return type(a) is type(b) and a.describe() == b.describe() and all(
        torch.equal(t, b.to_tensors()[s]) for s, t in a.to_tensors().items())


@pytest.mark.parametrize("name", list(LEAVES))
def test_valid_leaves_come_back_exactly(name):
    tensors, described = encode({"w": LEAVES[name]})
    assert same(decode(tensors, described)["w"], LEAVES[name])


@pytest.mark.parametrize("description", [["int8"], {"scheme": "int8"}, {"kind": 8}, {"kind": "int9"}])
def test_a_description_without_a_known_kind_is_a_format_error(description):
    tensors, _ = encode({"w": LEAVES["int8"]})
    with pytest.raises(FormatError, match="leaf"):
        decode(tensors, {"w": description})


BAD = [
    ("int8", "description", ["not", "a", "dict"]),
    ("int8", "tensor", [1, 2, 3]),
    ("int8", "qdata", torch.zeros(32, 64)),  # float codes
    ("int8", "qdata", torch.zeros(32, 64, 1, dtype=torch.int8)),
    ("int8", "scales", torch.zeros(31)),
    ("int8", "scales", torch.zeros(32, dtype=torch.int32)),
    ("int8", "shape", [64, 32]),
    ("int4", "description", "int4"),
    ("int4", "group_size", "32"),
    ("int4", "group_size", True),
    ("int4", "group_size", 0),
    ("int4", "group_size", 33),
    ("int4", "group_size", 64),  # disagrees with qdata [N, K/G, G/2]
    ("int4", "group_size", None),
    ("int4", "keep_qdata", "yes"),
    ("int4", "zero_points", torch.full((32, 2), 16, dtype=torch.uint8)),
    ("int4", "zero_points", torch.zeros(32, 3, dtype=torch.uint8)),
    ("int4", "qdata", torch.zeros(32, 2, 16, dtype=torch.int8)),
    ("int4", "scales", torch.zeros(32, 2, dtype=torch.int64)),
    ("int4", "shape", "32x64"),
    ("dense", "weight", torch.zeros(32, 64, dtype=torch.int8)),
    ("dense", "keep_dense", 1),
    ("dense", "shape", [32, 65]),
]


@pytest.mark.parametrize("name,field,value", BAD, ids=[f"{n}-{f}-{i}" for i, (n, f, _) in enumerate(BAD)])
def test_a_wrong_part_is_a_format_error(name, field, value):
    tensors, description = stored(LEAVES[name])
    if field == "description":
        description = value
    elif field == "tensor":
        tensors[next(iter(tensors))] = value
    elif isinstance(value, torch.Tensor):
        tensors[field] = value
    else:
        description[field] = value
    cls = type(LEAVES[name])
    with pytest.raises(FormatError, match=cls.kind):
        cls.from_tensors(tensors, description)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(list(LEAVES)), key=st.sampled_from(["shape", "group_size", "keep_qdata", "keep_dense",
                                                                "scheme", "extra"]), value=JSON)
def test_fuzz_descriptions(name, key, value):
    tensors, description = stored(LEAVES[name])
    description[key] = value
    cls = type(LEAVES[name])
    try:
        leaf = cls.from_tensors(tensors, description)
    except FormatError:
        return
    assert isinstance(leaf, (Int8Weight, Int4Weight, DenseWeight))
    assert all(torch.equal(t, leaf.to_tensors()[s]) for s, t in tensors.items())
