"""Math identities of the explicit KV cache: incremental == full scoring, ragged batches ==
one prompt at a time, rollback == never having written, and the sampler's support."""

from __future__ import annotations

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn.sampling import filter_logits, sample


def tokens_for(cfg, shape, seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("splits", [(11,), (7, 4), (1, 1, 1, 8), (5, 1, 1, 1, 3)])
def test_prefill_then_decode_equals_full_sequence(family_model, splits):
    params, cfg = family_model
    toks = tokens_for(cfg, (2, sum(splits)))
    full, _ = pf.forward(params, cfg, toks)
    cache = pf.init_cache(params, cfg, 2, 16)
    pieces, start = [], 0
    for n in splits:
        logits, cache = pf.forward(params, cfg, toks[:, start:start + n], cache)
        pieces.append(logits)
        start += n
    assert cache.lengths.tolist() == [sum(splits)] * 2
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-4


def test_rows_at_different_lengths_match_each_row_alone(family_model):
    params, cfg = family_model
    a, b = tokens_for(cfg, (1, 9), 1), tokens_for(cfg, (1, 4), 2)
    cache = pf.init_cache(params, cfg, 2, 16)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.int64)], 1)])
    _, cache = pf.forward(params, cfg, padded, cache)
    cache = cache.with_lengths([9, 4])  # the padding of row 1 is now stale
    step = tokens_for(cfg, (2, 3), 3)
    logits, cache = pf.forward(params, cfg, step, cache)
    for row, prefix in enumerate([a, b]):
        alone, _ = pf.forward(params, cfg, torch.cat([prefix, step[row:row + 1]], 1))
        assert (logits[row] - alone[0, -3:]).abs().max().item() < 1e-4


def test_rollback_equals_never_having_written(family_model):
    params, cfg = family_model
    toks = tokens_for(cfg, (2, 10), 4)
    cache = pf.init_cache(params, cfg, 2, 16)
    _, cache = pf.forward(params, cfg, toks[:, :6], cache)
    _, cache = pf.forward(params, cfg, tokens_for(cfg, (2, 3), 5), cache)  # speculative junk
    cache = cache.rollback([3, 3])
    logits, _ = pf.forward(params, cfg, toks[:, 6:], cache)
    full, _ = pf.forward(params, cfg, toks)
    assert (logits - full[:, 6:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("preset", FAMILIES)
def test_ragged_batch_generate_equals_one_by_one(preset):
    params, cfg = random_model(preset, seed=7)
    prompts = [tokens_for(cfg, (1, n), n)[0].tolist() for n in (3, 11, 6)]
    batch = pf.generate(params, cfg, prompts, 12, eos_token_ids=())
    for prompt, got in zip(prompts, batch):
        alone = pf.generate(params, cfg, [prompt], 12, eos_token_ids=())[0]
        assert got.tokens == alone.tokens and got.finish_reason == "length"


def test_greedy_generate_follows_full_forward_argmax():
    params, cfg = random_model("tiny-openpangu", seed=8)
    prompt = tokens_for(cfg, (1, 5))[0].tolist()
    out = pf.generate(params, cfg, [prompt], 10, eos_token_ids=())[0].tokens
    seq = list(prompt)
    for _ in range(10):
        logits, _ = pf.forward(params, cfg, torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    cfg = pf.ModelConfig.preset("tiny-gpt")
    params = pf.init_params(cfg, seed=9)  # nearly flat logits: sampling really varies
    sp = pf.SamplingParams(temperature=1.5, top_k=50, top_p=0.95)
    prompts = [[1, 2, 3], [4, 5]]
    runs = [pf.generate(params, cfg, prompts, 20, sp, seed=s, eos_token_ids=()) for s in (0, 0, 1)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert [c.tokens for c in runs[0]] != [c.tokens for c in runs[2]]


def test_eos_stops_a_row_and_is_reported():
    params, cfg = random_model("tiny-gpt", seed=10)
    first = pf.generate(params, cfg, [[5, 6, 7]], 8, eos_token_ids=())[0].tokens
    eos = first[3]
    out = pf.generate(params, cfg, [[5, 6, 7], [9]], 8, eos_token_ids=[eos])
    assert out[0].tokens == first[: first.index(eos) + 1] and out[0].finish_reason == "eos"


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.5), (5, 0.7)])
def test_top_k_top_p_never_leave_their_support(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=gen) * 2
    sp = pf.SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)
    # the support computed by hand: sorted by probability, keep the top_k, then the smallest
    # prefix whose mass reaches top_p
    support = []
    for row in logits:
        order = (row / 0.8).argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        probs = (row / 0.8)[order].softmax(-1)
        keep, mass = [], 0.0
        for tok, p in zip(order, probs.tolist()):
            keep.append(tok)
            mass += p
            if mass >= top_p:
                break
        support.append(set(keep))
    finite = torch.isfinite(filter_logits(logits, sp))
    for row in range(4):
        assert set(finite[row].nonzero().flatten().tolist()) == support[row]
    for _ in range(200):
        drawn = sample(logits, sp, gen)
        assert all(int(t) in support[r] for r, t in enumerate(drawn))


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, False, False]])
    sp = pf.SamplingParams(repetition_penalty=1.2)
    assert sample(logits, sp, seen=seen).item() == 1  # 2.0 / 1.2 < 1.9


def test_logits_index_selects_one_position_per_row(family_model):
    params, cfg = family_model
    toks = tokens_for(cfg, (3, 8), 11)
    full, _ = pf.forward(params, cfg, toks)
    index = torch.tensor([7, 2, 5])
    some, _ = pf.forward(params, cfg, toks, logits_index=index)
    assert some.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(some[:, 0], full[torch.arange(3), index], atol=1e-5, rtol=1e-6)  # logits up to ~25


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_is_argmax_with_the_first_of_equal_maxima(dtype):
    from pangu_fn.sampling import greedy_tokens

    logits = torch.randn(3, 5, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, :, 7] = logits[0, :, 250] = 9.0  # ties: both argmax and greedy_tokens pick 7
    logits[1, 2] = 0.0  # a row that is all ties: index 0
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert greedy_tokens(logits)[0].tolist() == [7] * 5 and greedy_tokens(logits)[1, 2].item() == 0


@pytest.mark.parametrize("preset", FAMILIES)
def test_decode_steps_trace_as_one_graph(preset):
    """Under torch.compile(fullgraph=True) a decode step with a cache traces without a graph
    break (no host syncs on the traced path: what CUDA graphs need) and gives the eager logits.
    Backend "eager" checks the trace, not a compiler."""
    from pangu_fn.cache import KVCache

    params, cfg = random_model(preset, seed=2)
    toks = tokens_for(cfg, (2, 9), 6)
    torch._dynamo.reset()
    step = torch.compile(lambda t, keys, values, lengths: pf.forward(params, cfg, t, KVCache(keys, values, lengths)),
                         fullgraph=True, backend="eager")
    eager = pf.init_cache(params, cfg, 2, 16)
    _, eager = pf.forward(params, cfg, toks[:, :6], eager)
    traced = KVCache([k.clone() for k in eager.keys], [v.clone() for v in eager.values], eager.lengths.clone())
    for i in range(6, 9):
        want, eager = pf.forward(params, cfg, toks[:, i:i + 1], eager)
        got, traced = step(toks[:, i:i + 1], traced.keys, traced.values, traced.lengths)
        assert (got - want).abs().max().item() < 1e-4
    assert traced.lengths.tolist() == [9, 9]
