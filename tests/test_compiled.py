"""Compiled decoding (pangu_fn.compiled) against eager decoding: the same greedy tokens, logits
within the dtype's rounding, for all three families, ragged batches, quantized and bf16 trees
and speculative decoding.

Most checks compile with torch.compile's "eager" backend: dynamo traces the same fullgraph
programs (static cache, tensor lengths, scatter writes, custom ops for the native kernels)
without generating code, so they cost seconds. One inductor test (C++ code generation, about
a minute here) runs when PANGU_SLOW_TESTS is set.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn import compiled
from pangu_fn.sampling import greedy_tokens

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]
EAGER = compiled.CompileOptions(backend="eager")


def decode_both(params, cfg, prompts, steps, opts=EAGER):
    """Teacher-forced on the eager tokens: per step (eager logits [B, V], compiled logits,
    compiled greedy tokens), prefill included as step 0."""
    B, T = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(B, T, dtype=torch.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    out = []
    with torch.inference_mode():
        cache = pf.init_cache(params, cfg, B, T + steps)
        logits, cache = pf.forward(params, cfg, tokens, cache, logits_index=lengths - 1)
        cache = cache.with_lengths(lengths)
        eager = logits[:, 0]
        progs = compiled.programs(params, cfg, opts)
        ccache = compiled.static_cache(params, cfg, B, T + steps, opts)
        got, ccache = compiled.prefill(progs, params, prompts, ccache)
        out.append((eager, got, greedy_tokens(got)))
        for _ in range(steps):
            tok = greedy_tokens(eager)
            logits, cache = pf.forward(params, cfg, tok[:, None], cache)
            eager = logits[:, -1]
            got, got_tok, ccache = progs.decode(params, tok, ccache)
            out.append((eager, got, got_tok))
    assert ccache.lengths.tolist() == (lengths + steps).tolist()
    return out


def assert_close_and_same_argmax(steps, rel):
    """Logits within `rel` of the largest eager logit; the same argmax wherever the eager top two
    are further apart than twice that."""
    for i, (eager, got, got_tok) in enumerate(steps):
        tol = rel * max(1.0, eager.float().abs().max().item())
        err = (eager.float() - got.float()).abs().max().item()
        assert err <= tol, f"step {i}: logits differ by {err} (tolerance {tol})"
        top2 = eager.float().topk(2, -1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol  # rows whose argmax rounding cannot flip
        assert torch.equal(got_tok[clear], greedy_tokens(eager)[clear]), f"step {i}: greedy tokens differ"


@pytest.mark.parametrize("preset", FAMILIES)
def test_compiled_decode_matches_eager(preset):
    params, cfg = random_model(preset)
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS, 6), 1e-4)
    eager = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=())
    got = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(), compile=EAGER)  # the same programs
    assert [c.tokens for c in got] == [c.tokens for c in eager]


@pytest.mark.parametrize("tree", ["bf16", "bf16-leaves", "int8", "int4"])
def test_compiled_decode_of_reduced_precision_trees(tree):
    params, cfg = random_model("tiny-openpangu", num_layers=1)  # one block: half the tracing
    if tree == "bf16":  # plain bf16 tensors: compiled graphs call the native bf16 kernel as a custom op
        params = pf.astype(params, torch.bfloat16)
    elif tree == "bf16-leaves":
        params = pf.quantize(params, pf.QuantRecipe(scheme="bf16"))
    else:
        params = pf.quantize(params, pf.QuantRecipe(scheme=tree, group_size=32))
    # bf16 activations: compiled attention stays bf16 where eager upcasts few queries to fp32
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS[:2], 4), 2e-2)


def test_stream_compiled_sampling_matches_eager():
    params, cfg = random_model("tiny-gpt")
    sp = pf.SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.2)
    eager = list(pf.stream(params, cfg, PROMPTS, 5, sp, seed=3, eos_token_ids=(3,)))
    got = list(pf.stream(params, cfg, PROMPTS, 5, sp, seed=3, eos_token_ids=(3,), compile=EAGER))
    assert got == eager


def test_speculative_compiled_equals_greedy():
    params, cfg = random_model("tiny-openpangu")
    eager = pf.generate(params, cfg, PROMPTS[:2], 8, eos_token_ids=())
    got = pf.speculative_generate(params, cfg, PROMPTS[:2], 8, eos_token_ids=(), drafter="self", k=2,
                                  compile=EAGER)
    assert [c.tokens for c in got] == [c.tokens for c in eager]


def test_greedy_stop_check_cuts_rows_after_eos():
    params, cfg = random_model("tiny-gpt")
    eager = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=())
    eos = eager[1].tokens[2]  # row 1 stops at its third token (others where that token appears)
    want = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(eos,))
    got = pf.generate(params, cfg, PROMPTS, 6, eos_token_ids=(eos,), compile=EAGER)
    assert got == want and got[1].finish_reason == "eos"


def test_bad_compile_argument_is_a_config_error():
    params, cfg = random_model("tiny-gpt")
    with pytest.raises(pf.ConfigError, match="backend"):
        pf.generate(params, cfg, PROMPTS, 2, compile="tvm")
    with pytest.raises(pf.ConfigError, match="expected a bool"):
        pf.generate(params, cfg, PROMPTS, 2, compile=3)


def test_buckets_hold_the_positions_needed():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    for needed in (1, 63, 64, 65, 100, cfg.max_seq_len):
        n = compiled.cache_len(cfg, needed)
        assert needed <= n <= cfg.max_seq_len
        for prompt in (1, 5, 16, 17, needed):
            if prompt <= n:
                assert prompt <= compiled.prefill_len(prompt, n) <= n


@pytest.mark.skipif(not os.environ.get("PANGU_SLOW_TESTS"), reason="inductor C++ codegen (~1 min); set PANGU_SLOW_TESTS=1")
def test_inductor_decode_matches_eager():
    params, cfg = random_model("tiny-openpangu")
    opts = compiled.CompileOptions(backend="inductor")
    assert_close_and_same_argmax(decode_both(params, cfg, PROMPTS, 4, opts), 1e-4)
    int8 = pf.quantize(params, pf.QuantRecipe(scheme="int8"))
    assert_close_and_same_argmax(decode_both(int8, cfg, PROMPTS[:2], 3, opts), 2e-2)
