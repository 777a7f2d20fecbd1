"""Quantized trees as values: the transform leaves its input alone, quantized trees run in
forward (with and without a cache), generate and stream, save and load to identical logits,
GPTQ beats round-to-nearest on its own objective, and bad recipes get typed errors."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.cache import compute_dtype
from pangu_fn.quant import (
    DenseWeight,
    Int4Weight,
    Int8Weight,
    QuantRecipe,
    calibration_windows,
    collect_hessians,
    quantize,
    quantize_int4,
)
from pangu_fn.quant.gptq import gptq_int4
from pangu_fn.quant.packing import cpu_layout_known
from pangu_fn.tree import flatten

RECIPES = {
    "int8": QuantRecipe("int8"),
    "int4-g32-asym": QuantRecipe("int4", group_size=32, symmetric=False),
    "int4-head-int8": QuantRecipe("int4", group_size=32, head="int8", overrides=(("*.down", "int8"),)),
    "int4-head-int4": QuantRecipe("int4", group_size=32, head="int4"),
    "bf16": QuantRecipe("bf16"),
    "fp16": QuantRecipe("fp16"),
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(RECIPES))
def test_quantized_trees_run_and_track_the_float_model(family_model, name):
    params, cfg = family_model
    before = {k: v.clone() for k, v in flatten(params).items()}
    q = quantize(params, RECIPES[name])
    assert all(torch.equal(before[k], v) for k, v in flatten(params).items())  # input untouched
    pf.validate(q, cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    ref, _ = pf.forward(params, cfg, tokens)
    logits, _ = pf.forward(q, cfg, tokens)
    assert logits.dtype == RECIPES[name].dtype == compute_dtype(q)
    bound = {"int8": 0.05, "bf16": 0.05, "fp16": 0.01}.get(name, 0.35)  # 4-bit of random weights is coarse
    assert rel_error(logits, ref) < bound
    # a cache gives the same logits as a full forward (prefill 7, then 5 one-token steps)
    cache = pf.init_cache(q, cfg, 2, 12)
    assert cache.keys[0].dtype == RECIPES[name].dtype
    steps = [pf.forward(q, cfg, tokens[:, :7], cache)]
    for t in range(7, 12):
        steps.append(pf.forward(q, cfg, tokens[:, t:t + 1], steps[-1][1]))
    cached = torch.cat([s[0] for s in steps], dim=1)
    assert rel_error(cached, logits) < 0.02


def test_leaf_kinds_follow_the_recipe():
    params, _ = random_model("tiny-openpangu")
    q = quantize(params, QuantRecipe("int4", group_size=32, overrides=(("*.down", "int8"), ("blocks.1.attn.*", "keep")),
                                     head="int8"))
    assert isinstance(q["blocks"][0]["attn"]["q"]["weight"], Int4Weight)
    assert isinstance(q["blocks"][0]["mlp"]["down"]["weight"], Int8Weight)
    assert isinstance(q["blocks"][1]["attn"]["o"]["weight"], DenseWeight)  # kept: bf16, prepacked
    assert isinstance(q["tok_embed"]["weight"], Int8Weight)  # tied head quantized, looked up by row
    assert q["blocks"][0]["attn"]["q"]["bias"].dtype == torch.bfloat16
    plain = quantize(params, QuantRecipe("bf16", prepack=False))
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in flatten(plain).values())


def test_quantized_embedding_rows_equal_dequantized_rows():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[0, 39, 7], [7, 7, 1]])
    for leaf in (quantize_int4(w, 32, False, torch.bfloat16, keep_qdata=True),
                 quantize_int4(w, 32, True, torch.float32)):
        assert torch.equal(leaf.embedding(tokens), leaf.dequantize()[tokens])
    i8 = Int8Weight(torch.randint(-127, 128, (40, 64), dtype=torch.int8), torch.rand(40))
    assert torch.equal(i8.embedding(tokens), i8.dequantize()[tokens])


def test_int4_embedding_from_the_cpu_pack_alone():
    """A tied int4 head whose canonical codes were dropped for the CPU pack: the lookup unpacks
    only the row blocks it needs (full blocks and the short tail) and gives the same rows."""
    w = torch.randn(200, 64, generator=torch.Generator().manual_seed(1))
    leaf = quantize_int4(w, 32, True, torch.bfloat16)
    expected = leaf.dequantize()
    leaf.linear(torch.randn(1, 64, dtype=torch.bfloat16))  # builds the CPU pack
    assert (leaf._qdata is None) == cpu_layout_known()
    tokens = torch.tensor([[0, 199, 63, 64, 65], [127, 128, 191, 192, 7]])
    assert torch.equal(leaf.embedding(tokens), expected[tokens])


@pytest.mark.parametrize("name", ["int8", "int4-head-int4", "bf16"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name):
    params, cfg = random_model("tiny-gpt")
    q = quantize(params, RECIPES[name])
    pf.save(tmp_path / "q", q, cfg)
    loaded, cfg2 = pf.load(tmp_path / "q")
    assert cfg2 == cfg
    for k, leaf in flatten(q).items():
        other = flatten(loaded)[k]
        assert type(other) is type(leaf)
        if not isinstance(leaf, torch.Tensor):
            assert leaf.describe() == other.describe()
            assert all(torch.equal(a, other.to_tensors()[s]) for s, a in leaf.to_tensors().items())
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(pf.forward(q, cfg, tokens)[0], pf.forward(loaded, cfg, tokens)[0])
    assert pf.nbytes(loaded) == pf.nbytes(q)


def test_generate_and_stream_run_on_quantized_trees():
    params, cfg = random_model("tiny-openpangu")
    q = quantize(params, QuantRecipe("int4", group_size=32, head="int8"))
    prompts = [[1, 5, 9, 3], [7, 8]]
    sp = pf.SamplingParams(temperature=0.8, top_k=20)
    out = pf.generate(q, cfg, prompts, 6, sampling=sp, seed=3, eos_token_ids=())
    events = list(pf.stream(q, cfg, prompts, 6, sampling=sp, seed=3, eos_token_ids=()))
    assert [c.tokens for c in out] == [[e.token for e in events if e.row == r] for r in range(2)]
    assert all(len(c.tokens) == 6 and c.finish_reason == "length" for c in out)
    # greedy decode equals argmax of a full forward over the generated sequence
    greedy = pf.generate(q, cfg, [prompts[0]], 5, eos_token_ids=())[0].tokens
    seq = torch.tensor([prompts[0] + greedy])
    logits, _ = pf.forward(q, cfg, seq)
    assert logits[0, 3:-1].argmax(-1).tolist() == greedy[:5]


def test_astype_and_to_keep_the_tree_working():
    params, cfg = random_model("tiny-gpt")
    q = quantize(params, QuantRecipe("int4", group_size=32, symmetric=False))
    q32 = pf.astype(q, "fp32")  # scales to fp32: the dequantize-then-matmul path
    assert compute_dtype(q32) == torch.float32
    assert q32["blocks"][0]["mlp"]["up"]["weight"].cpu_kernel_data is None
    tokens = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    assert rel_error(pf.forward(q32, cfg, tokens)[0], pf.forward(q, cfg, tokens)[0]) < 0.02
    moved = pf.to_device(q, "cpu")
    assert torch.equal(pf.forward(moved, cfg, tokens)[0], pf.forward(q, cfg, tokens)[0])


def test_gptq_lowers_the_layer_output_error_it_minimises():
    """GPTQ minimises ||(W - Q) X|| for inputs X with correlated features; on such inputs it
    must beat round-to-nearest at the same group size (a property of the method, checked
    on a layer whose Hessian is far from the identity)."""
    gen = torch.Generator().manual_seed(0)
    k, n = 128, 64
    z = torch.randn(4096, k, generator=gen)
    x = z.clone()  # AR(1) features: neighbour correlation 0.9
    for j in range(1, k):
        x[:, j] = 0.9 * x[:, j - 1] + (1 - 0.9**2) ** 0.5 * z[:, j]
    w = torch.randn(n, k, generator=gen)
    hessian = x.t() @ x / x.shape[0]
    for sym in (True, False):
        rtn = quantize_int4(w, 32, sym, torch.float32)
        gptq = quantize_int4(w, 32, sym, torch.float32, hessian=hessian)
        err_rtn = ((w - rtn.dequantize()) @ x.t()).norm()
        err_gptq = ((w - gptq.dequantize()) @ x.t()).norm()
        assert err_gptq < 0.6 * err_rtn  # measured 0.44 here
    # with uncorrelated inputs (H = I) there is nothing to compensate: GPTQ is round-to-nearest
    same = quantize_int4(w, 32, True, torch.float32, hessian=torch.eye(k))
    assert torch.equal(same.qdata, quantize_int4(w, 32, True, torch.float32).qdata)
    codes, scales, zeros = gptq_int4(w, torch.eye(k), 32, False, torch.float32)
    assert codes.max() <= 15 and zeros is not None and scales.shape == (n, 4)


def test_calibration_records_the_inputs_each_linear_sees():
    params, cfg = random_model("tiny-openpangu")
    windows = calibration_windows(torch.arange(500) % cfg.vocab_size, 16, 6)
    assert windows.shape == (6, 16)
    hs = collect_hessians(params, cfg, windows, ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.1.mlp.down"],
                          max_bytes=1)  # one linear per pass: results must not depend on grouping
    together = collect_hessians(params, cfg, windows, ["blocks.0.attn.q", "blocks.1.mlp.down"])
    assert torch.allclose(hs["blocks.0.attn.q"], hs["blocks.0.attn.k"])  # same input
    assert torch.allclose(hs["blocks.1.mlp.down"], together["blocks.1.mlp.down"])
    assert hs["blocks.1.mlp.down"].shape == (cfg.intermediate_size, cfg.intermediate_size)
    q = quantize(params, QuantRecipe("gptq", group_size=32), cfg=cfg, calib=windows)
    assert isinstance(q["blocks"][1]["mlp"]["down"]["weight"], Int4Weight)


def test_a_scheme_name_stands_for_its_default_recipe():
    params, _ = random_model("tiny-gpt")
    by_name, by_recipe = quantize(params, "int8"), quantize(params, QuantRecipe("int8"))
    assert isinstance(by_name["blocks"][0]["mlp"]["down"]["weight"], Int8Weight)
    for a, b in zip(flatten(by_name).values(), flatten(by_recipe).values()):
        assert type(a) is type(b)
        assert torch.equal(*(x if isinstance(x, torch.Tensor) else x.dequantize() for x in (a, b)))


@pytest.mark.parametrize("make, match", [
    (lambda p: quantize(p, QuantRecipe("int3")), "unknown quantization scheme"),
    (lambda p: quantize(p, QuantRecipe("int4", group_size=48)), "group_size"),
    (lambda p: quantize(p, QuantRecipe("int4", group_size=128)), "does not divide"),  # K = 64
    (lambda p: quantize(quantize(p, QuantRecipe("int8")), QuantRecipe("int8")), "already quantized"),
    (lambda p: quantize(p, QuantRecipe("gptq", group_size=32)), "calibration"),
    (lambda p: quantize(p, QuantRecipe("int8", keep=("*.dwon",))), "matches no linear"),
    (lambda p: quantize(p, QuantRecipe("int8", overrides=(("*.down", "int2"),))), "expected a choice"),
    (lambda p: quantize(p, QuantRecipe("bf16", head="int8")), "whole tree"),
    (lambda p: quantize(p, "int3"), "unknown quantization scheme"),
    (lambda p: quantize(p, {"scheme": "int8"}), "expected a QuantRecipe or a scheme name"),
])
def test_bad_recipes_raise_config_errors(make, match):
    params, _ = random_model("tiny-gpt")
    with pytest.raises(pf.ConfigError, match=match):
        make(params)


@pytest.mark.parametrize("drafter", ["self", "draft-model"])
def test_speculative_decoding_on_quantized_trees_equals_plain_greedy(drafter):
    from pangu_fn.speculative import speculative_generate

    params, cfg = random_model("tiny-openpangu")
    q = quantize(params, QuantRecipe("int4", group_size=32, head="int8"))
    if drafter == "draft-model":
        dparams, dcfg = random_model("tiny-openpangu", seed=5, num_layers=1)
        drafter = (quantize(dparams, QuantRecipe("int8")), dcfg)
    prompts = [[1, 5, 9, 3, 4, 4], [7, 8]]
    plain = [c.tokens for c in pf.generate(q, cfg, prompts, 16, eos_token_ids=())]
    spec = speculative_generate(q, cfg, prompts, 16, eos_token_ids=(), drafter=drafter, k=3)
    assert [c.tokens for c in spec] == plain
