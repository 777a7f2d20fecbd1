"""The library on an accelerator (CUDA by default; `PANGU_TEST_DEVICE=npu` for Ascend, `cpu` to
dry-run the file), against the CPU and against the identities the CPU tests use: fp32 logits
equal the CPU's, the cache equals full scoring, ragged batches equal one prompt at a time,
quantized trees equal their CPU selves, speculative decoding equals plain greedy decoding and
samples the target's distribution, and the CLI runs there. Skipped where the device is absent
(CI has none); docs/benchmarks.md says when it last ran on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, random_model
from test_speculative import RAGGED, drafter_for, flat_model
from test_speculative_lossless import PROMPT, ROWS, chi_square, chi_square_bound, exact_joint, perturbed, small_model

import pangu_fn as pf
from pangu_fn.quant import QuantRecipe, kernels, quantize, quantize_int4, quantize_int8
from pangu_fn.speculative import DraftModel, LookupFirst, PromptLookup, speculative_generate
from pangu_fn.tokenizer import load_tokenizer

DEVICE = os.environ.get("PANGU_TEST_DEVICE", "cuda")
DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"


def _available(device: str) -> bool:
    try:
        pf.select_device(device)
        return True
    except pf.ConfigError:
        return False


pytestmark = pytest.mark.skipif(not _available(DEVICE), reason=f"needs a {DEVICE} device")


def tokens_for(cfg, shape, seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset", FAMILIES)
def test_fp32_logits_equal_the_cpu(preset):
    params, cfg = random_model(preset)
    toks = tokens_for(cfg, (2, 12))
    ref, _ = pf.forward(params, cfg, toks)
    got, _ = pf.forward(pf.to_device(params, DEVICE), cfg, toks.to(DEVICE))
    assert got.device.type == torch.device(DEVICE).type and got.dtype == torch.float32
    assert rel_error(got, ref) < 1e-4


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(preset, dtype):
    params, cfg = random_model(preset, seed=3)
    toks = tokens_for(cfg, (2, 12), 1)
    ref, _ = pf.forward(params, cfg, toks)
    got, _ = pf.forward(pf.to_device(pf.astype(params, dtype), DEVICE), cfg, toks.to(DEVICE))
    assert got.dtype == dtype and rel_error(got, ref) < 0.05


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_equals_full_sequence(preset, dtype):
    params, cfg = random_model(preset, seed=1)
    params = pf.to_device(pf.astype(params, dtype), DEVICE)
    toks = tokens_for(cfg, (2, 11), 2).to(DEVICE)
    full, _ = pf.forward(params, cfg, toks)
    cache = pf.init_cache(params, cfg, 2, 16)
    assert cache.keys[0].device.type == toks.device.type and cache.keys[0].dtype == dtype
    pieces = []
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 11)]:
        logits, cache = pf.forward(params, cfg, toks[:, start:stop], cache)
        pieces.append(logits)
    assert cache.lengths.tolist() == [11, 11]
    assert rel_error(torch.cat(pieces, 1), full) < (1e-5 if dtype == torch.float32 else 0.02)


@pytest.mark.parametrize("preset", FAMILIES)
def test_ragged_batch_generate_equals_one_by_one(preset):
    params, cfg = random_model(preset, seed=7)
    params = pf.to_device(params, DEVICE)
    prompts = [tokens_for(cfg, (1, n), n)[0].tolist() for n in (3, 11, 6)]
    batch = pf.generate(params, cfg, prompts, 12, eos_token_ids=())
    for prompt, got in zip(prompts, batch):
        alone = pf.generate(params, cfg, [prompt], 12, eos_token_ids=())[0]
        assert got.tokens == alone.tokens and got.finish_reason == "length"


def test_greedy_generate_follows_the_cpu_forward_argmax():
    """Tokens made on the device, scored on the CPU without a cache: each is the CPU's argmax
    (the model's logits are far from ties, so fp32 round-off cannot flip one)."""
    params, cfg = random_model("tiny-openpangu", seed=8)
    prompt = tokens_for(cfg, (1, 5))[0].tolist()
    out = pf.generate(pf.to_device(params, DEVICE), cfg, [prompt], 10, eos_token_ids=())[0].tokens
    logits, _ = pf.forward(params, cfg, torch.tensor([prompt + out]))
    assert logits[0, len(prompt) - 1:-1].argmax(-1).tolist() == out


def test_seeded_sampling_on_the_device_is_reproducible_and_seed_dependent():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    params = pf.to_device(pf.init_params(cfg, seed=9), DEVICE)
    sp = pf.SamplingParams(temperature=1.5, top_k=50, top_p=0.95)
    runs = [pf.generate(params, cfg, [[1, 2, 3], [4, 5]], 20, sp, seed=s, eos_token_ids=()) for s in (0, 0, 1)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]] != [c.tokens for c in runs[2]]


RECIPES = {"int8": QuantRecipe("int8"), "int4-g32-asym": QuantRecipe("int4", group_size=32, symmetric=False),
           "int4-head-int8": QuantRecipe("int4", group_size=32, head="int8")}


@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("preset", FAMILIES)
def test_quantized_trees_equal_their_cpu_selves(preset, name):
    """Quantized on the CPU, moved: with fp32 scales both sides dequantize the same codes, so the
    logits agree to fp32 round-off; with the bf16 scales the CPU's packed kernels use, closely."""
    params, cfg = random_model(preset, seed=4)
    q = quantize(params, RECIPES[name])
    toks = tokens_for(cfg, (2, 10), 3)
    for tree, bound in [(pf.astype(q, "fp32"), 1e-4), (q, 0.02)]:
        ref, _ = pf.forward(tree, cfg, toks)
        got, _ = pf.forward(pf.to_device(tree, DEVICE), cfg, toks.to(DEVICE))
        assert rel_error(got, ref) < bound, name
    out = pf.generate(pf.to_device(q, DEVICE), cfg, [[1, 2, 3], [4]], 6, eos_token_ids=())
    assert all(len(c.tokens) == 6 for c in out)


def on_device(drafter):
    """The drafter with a draft model's weights (its own, or a LookupFirst's fallback) moved."""
    if isinstance(drafter, DraftModel):
        return replace(drafter, params=pf.to_device(drafter.params, DEVICE))
    if isinstance(drafter, LookupFirst):
        return replace(drafter, fallback=on_device(drafter.fallback))
    return drafter


@pytest.mark.parametrize("scheme", ["int8", "int4-g32-sym", "int4-g64-asym"])
@pytest.mark.parametrize("n,k,rows", [(64, 128, 1), (256, 96, 5), (50, 64, 3), (128, 256, 40), (96, 512, 200)])
def test_weight_only_kernels_equal_dequantize_then_matmul(scheme, n, k, rows):
    """Each quantized leaf's `linear` on the device (torch's int8 / tinygemm int4 kernels for few
    bf16 rows where the shape fits; dequantize-then-matmul otherwise) against its dequantized
    weight times x in fp32."""
    gen = torch.Generator().manual_seed(n + k + rows)
    w, x, bias = torch.randn(n, k, generator=gen), torch.randn(rows, k, generator=gen), torch.randn(n, generator=gen)
    if scheme == "int8":
        leaf = quantize_int8(w, torch.bfloat16)
    else:
        group, symmetric = (32, True) if scheme == "int4-g32-sym" else (64, False)
        if k % group:
            pytest.skip("K is not a multiple of the group")
        leaf = quantize_int4(w, group, symmetric, torch.bfloat16)
    ref = torch.nn.functional.linear(x, leaf.dequantize(torch.float32), bias)
    moved = leaf.to(DEVICE)
    got = moved.linear(x.to(DEVICE, torch.bfloat16), bias.to(DEVICE, torch.bfloat16))
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    assert rel_error(got, ref) < 0.01
    if DEVICE == "cuda" and scheme != "int8":
        fits = n % 8 == 0 and k % 32 == 0
        assert (moved.cuda_kernel_data is not None) == fits
        if fits and rows < kernels.DEQUANTIZE_ROWS["int4"]:  # the kernel ran: compare with the fallback
            assert rel_error(got, kernels.dequantized_linear(moved, x.to(DEVICE, torch.bfloat16),
                                                             bias.to(DEVICE, torch.bfloat16))) < 0.01


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("drafter", ["draft", "self", "lookup", "lookup+draft"])
def test_speculative_greedy_equals_plain_greedy(preset, drafter):
    params, cfg = flat_model(preset)
    made = on_device(drafter_for(drafter, preset))
    params = pf.to_device(params, DEVICE)
    plain = pf.generate(params, cfg, RAGGED, 20, eos_token_ids=())
    for k, adaptive in [(1, False), (4, False), (3, True)]:
        spec = speculative_generate(params, cfg, RAGGED, 20, eos_token_ids=(), drafter=made, k=k, adaptive=adaptive)
        assert [c.tokens for c in spec] == [c.tokens for c in plain], (k, adaptive)


@pytest.mark.parametrize("drafter,sp", [("draft", pf.SamplingParams(temperature=1.0)),
                                        ("lookup", pf.SamplingParams(temperature=0.8, top_k=4))])
def test_speculative_sampling_on_the_device_matches_plain_sampling(drafter, sp):
    """The chi-square test of test_speculative_lossless, sampled on the device against the exact
    joint distribution of the first three tokens computed on the CPU."""
    params, cfg = small_model()
    made = DraftModel(pf.to_device(perturbed(params), DEVICE), cfg) if drafter == "draft" else PromptLookup()
    expected = exact_joint(params, cfg, sp) * ROWS
    out = speculative_generate(pf.to_device(params, DEVICE), cfg, [PROMPT] * ROWS, 5, sp, seed=2, eos_token_ids=(),
                               drafter=made, k=3)
    counts = torch.zeros(expected.shape, dtype=torch.float64)
    for c in out:
        counts[tuple(c.tokens[:3])] += 1
    stat, dof = chi_square(counts, expected)
    assert dof >= 3 and stat < chi_square_bound(dof), f"chi2 {stat:.1f} (dof {dof})"


@pytest.mark.skipif(not (DEMO / "target").is_dir(), reason="the committed demo model is not here")
def test_demo_pair_on_the_device_is_lossless_and_tracks_the_cpu():
    """The committed demo target in fp32 scores a held-out prompt as the CPU does; greedy speculation
    with the demo draft (and prompt lookup) on the device equals plain greedy there."""
    params, cfg = pf.load(DEMO / "target", dtype="fp32")
    draft, dcfg = pf.load(DEMO / "draft", device=DEVICE)
    rows = [json.loads(line) for line in (DEMO / "heldout.jsonl").read_text().splitlines()[:3]]
    tok = load_tokenizer(DEMO / "target")
    prompts = [tok.encode(r["text"])[:32] for r in rows]
    ref, _ = pf.forward(params, cfg, torch.tensor(prompts[:1]))
    params = pf.to_device(params, DEVICE)
    got, _ = pf.forward(params, cfg, torch.tensor(prompts[:1], device=DEVICE))
    assert rel_error(got, ref) < 1e-4
    plain = pf.generate(params, cfg, prompts, 24, eos_token_ids=())
    for drafter in [DraftModel(pf.astype(draft, "fp32"), dcfg), "lookup"]:
        spec = speculative_generate(params, cfg, prompts, 24, eos_token_ids=(), drafter=drafter, k=4)
        assert [c.tokens for c in spec] == [c.tokens for c in plain]


def test_cli_generate_and_bench_run_on_the_device(tmp_path):
    params, cfg = random_model("tiny-openpangu", seed=5)
    pf.save(tmp_path / "m", params, cfg)
    expect = pf.generate(pf.to_device(params, DEVICE), cfg, [[1, 2, 3]], 8, eos_token_ids=())[0].tokens
    cli = [sys.executable, "-m", "pangu_tools.cli"]
    gen = subprocess.run(cli + ["generate", "--model", str(tmp_path / "m"), "--device", DEVICE, "--prompt-ids", "1 2 3",
                                "--max-new-tokens", "8", "--no-eos", "--json", "--draft", "lookup"],
                         check=False, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["completions"][0]["tokens"] == expect
    bench = subprocess.run(cli + ["bench", "--model", str(tmp_path / "m"), "--device", DEVICE, "--prompt-len", "8",
                                  "--new-tokens", "8", "--repeats", "1", "--json", "-"],
                           check=False, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["device"] == pf.device_info(DEVICE)["name"]


COMPILED_TREES = {"bf16": lambda p: pf.astype(p, torch.bfloat16), "int8": lambda p: quantize(p, QuantRecipe("int8")),
                  "int4": lambda p: quantize(p, QuantRecipe("int4", group_size=32))}


@pytest.mark.parametrize("tree", ["fp32", *COMPILED_TREES])
@pytest.mark.parametrize("preset", FAMILIES)
def test_compiled_decode_equals_eager_on_the_device(preset, tree):
    """Inductor (CUDA graphs on CUDA) against eager on the device, teacher-forced on the eager
    tokens: logits within the dtype's rounding, the same greedy token where the eager top two
    are clearly apart (tests/test_compiled.py's check), and greedy generate token for token."""
    from test_compiled import PROMPTS, assert_close_and_same_argmax, decode_both

    from pangu_fn import compiled

    params, cfg = random_model(preset, seed=6)
    params = pf.to_device(params if tree == "fp32" else COMPILED_TREES[tree](params), DEVICE)
    opts = compiled.CompileOptions("inductor")
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS, 5, opts), 1e-4 if tree == "fp32" else 2e-2)
    if tree == "fp32":
        eager = pf.generate(params, cfg, PROMPTS, 5, eos_token_ids=())
        assert pf.generate(params, cfg, PROMPTS, 5, eos_token_ids=(), compile=opts) == eager


def test_compiled_speculative_equals_plain_greedy_on_the_device():
    params, cfg = flat_model("tiny-openpangu")
    params = pf.to_device(params, DEVICE)
    plain = pf.generate(params, cfg, RAGGED, 12, eos_token_ids=())
    spec = speculative_generate(params, cfg, RAGGED, 12, eos_token_ids=(), drafter="lookup", k=3, compile=True)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
