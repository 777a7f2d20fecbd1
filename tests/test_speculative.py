"""Speculative decoding on random tiny models: greedy output equals plain greedy `generate`
token for token (every drafter, every family, single prompts and ragged batches), caches after
rejections equal a fresh prefill of the kept tokens, and bad drafters / k get typed errors."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn.quant import DenseWeight, block_linears
from pangu_fn.speculative import (
    AdaptiveK,
    DraftModel,
    LookupFirst,
    Model,
    PromptLookup,
    SelfDraft,
    SpecStats,
    spec_init,
    spec_step,
    speculative_generate,
    speculative_stream,
)
from pangu_fn.tree import flatten

# repeats in the prompts give prompt lookup something to find
SINGLE = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
RAGGED = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10], [3, 4, 5, 3, 4, 11, 12, 13, 3], [40]]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small spend their time in per-op overhead; a thread pool only adds to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat_model(preset: str, seed: int = 0, **changes):
    """A random tiny model whose token embedding is scaled down, so that the residual stream is
    not dominated by it: the tied head then does not just repeat the input token, and the
    greedy continuations (and the drafts of a different model) vary."""
    params, cfg = random_model(preset, seed=seed, **changes)
    for name in ("tok_embed", "pos_embed"):
        if name in params:
            params[name] = {"weight": params[name]["weight"] * 0.1}
    return params, cfg


def drafter_for(name: str, preset: str):
    """A drafter for `flat_model(preset)`; the draft model is that model with every matrix
    perturbed, so that it accepts some drafts and rejects others."""
    if name == "draft":
        params, cfg = flat_model(preset)
        gen = torch.Generator().manual_seed(7)
        noisy = pytree.tree_map(lambda t: t + 0.05 * t.std() * torch.randn(t.shape, generator=gen) if t.dim() == 2 else t,
                         params)
        return DraftModel(noisy, cfg)
    if name.startswith("lookup+"):
        return LookupFirst(drafter_for(name.removeprefix("lookup+"), preset))
    return {"self": SelfDraft(), "self-all": SelfDraft(layers=2), "lookup": PromptLookup()}[name]


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("drafter", ["draft", "self", "self-all", "lookup", "lookup+draft", "lookup+self"])
@pytest.mark.parametrize("prompts", [SINGLE, RAGGED], ids=["single", "ragged"])
def test_greedy_equals_plain_greedy(preset, drafter, prompts):
    params, cfg = flat_model(preset)
    plain = pf.generate(params, cfg, prompts, 20, eos_token_ids=())
    for k, adaptive in [(4, False)] if prompts is SINGLE else [(1, False), (4, False), (3, True)]:
        stats = SpecStats()
        spec = speculative_generate(params, cfg, prompts, 20, eos_token_ids=(), drafter=drafter_for(drafter, preset),
                                    k=k, adaptive=adaptive, stats=stats)
        assert [c.tokens for c in spec] == [c.tokens for c in plain], (k, adaptive)
        assert all(c.finish_reason == "length" for c in spec)
        assert stats.tokens == sum(len(c.tokens) - 1 for c in spec)  # the first token comes from the prefill
        assert stats.accepted <= stats.drafted and stats.steps <= stats.row_steps


@pytest.mark.parametrize("drafter", ["draft", "self", "lookup"])
def test_eos_and_budget_stop_rows_like_plain_generate(drafter):
    params, cfg = flat_model("tiny-openpangu")
    plain = pf.generate(params, cfg, RAGGED, 20, eos_token_ids=())
    eos = plain[0].tokens[6]  # a token row 0 produces mid-way, so speculation must cut a step short
    expect = pf.generate(params, cfg, RAGGED, 20, eos_token_ids=[eos])
    got = speculative_generate(params, cfg, RAGGED, 20, eos_token_ids=[eos],
                               drafter=drafter_for(drafter, "tiny-openpangu"), k=5)
    assert [(c.tokens, c.finish_reason) for c in got] == [(c.tokens, c.finish_reason) for c in expect]
    assert got[0].finish_reason == "eos"
    events = list(speculative_stream(params, cfg, RAGGED, 20, eos_token_ids=[eos], drafter="lookup", k=5))
    assert [e.token for e in events if e.row == 0] == expect[0].tokens
    assert [e.finish_reason for e in events if e.row == 0][-1] == "eos"
    assert all(sum(e.row == r and e.finish_reason is not None for e in events) == 1 for r in range(len(RAGGED)))


def test_greedy_with_repetition_penalty_equals_plain():
    params, cfg = flat_model("tiny-gpt")
    sp = pf.SamplingParams(repetition_penalty=1.5)
    plain = pf.generate(params, cfg, RAGGED, 16, sp, eos_token_ids=())
    for drafter in ("self", "lookup", drafter_for("draft", "tiny-gpt")):
        spec = speculative_generate(params, cfg, RAGGED, 16, sp, eos_token_ids=(), drafter=drafter, k=4)
        assert [c.tokens for c in spec] == [c.tokens for c in plain]


def test_context_limit_is_respected():
    params, cfg = flat_model("tiny-gpt")  # max_seq_len 128
    prompts = [[5] * 100, [6] * 3]
    plain = pf.generate(params, cfg, prompts, 28, eos_token_ids=())
    spec = speculative_generate(params, cfg, prompts, 28, eos_token_ids=(), drafter="lookup", k=8)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]


def prefill_cache(params, cfg, tokens, n):
    cache = pf.init_cache(params, cfg, 1, max(n, 1))
    if n:
        _, cache = pf.forward(params, cfg, torch.tensor([tokens[:n]]), cache)
    return cache


def assert_cache_equals_prefill(cache, row, params, cfg, tokens):
    n = int(cache.lengths[row])
    fresh = prefill_cache(params, cfg, tokens, n)
    assert len(cache.keys) == len(fresh.keys) == cfg.num_blocks
    for buf, ref in zip(cache.keys + cache.values, fresh.keys + fresh.values):
        assert (buf[row, :, :n] - ref[0, :, :n]).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", FAMILIES)
def test_caches_after_rejections_equal_fresh_prefill(preset):
    params, cfg = flat_model(preset)
    draft = drafter_for("draft", preset)
    target = Model(params, cfg)
    rng = torch.Generator().manual_seed(0)
    for drafter, sampling in [(draft, pf.SamplingParams()), (draft, pf.SamplingParams(temperature=1.0)),
                              (SelfDraft(), pf.SamplingParams(temperature=0.8, top_k=20))]:
        state, _ = spec_init(target, drafter, RAGGED, 30, sampling, rng, eos_token_ids=(), k=4)
        rejected = 0
        for _ in range(4):
            state, _, stats = spec_step(target, drafter, state, sampling, rng)
            rejected += stats.drafted - stats.accepted
            for row in range(len(state.rows)):
                n = int(state.lengths[row])
                tokens = state.tokens[row, :n].tolist()
                assert int(state.target_cache.lengths[row]) == n - 1
                assert_cache_equals_prefill(state.target_cache, row, params, cfg, tokens)
                if isinstance(drafter, DraftModel):
                    assert n - 2 <= int(state.draft.lengths[row]) <= n - 1
                    assert_cache_equals_prefill(state.draft, row, drafter.params, drafter.cfg, tokens)
        assert rejected > 0  # the property was exercised on rolled-back positions


def test_lookup_first_mixes_rows_and_its_draft_cache_keeps_only_real_tokens():
    """Row 0 takes (stub) lookup drafts that are the target's own greedy continuation, so they
    are all accepted; the other rows take a draft model that mostly disagrees with the target.
    The draft cache must then hold only real tokens (nothing the draft model proposed for row
    0), and when sampling, q is one-hot on row 0's drafts and the draft model's elsewhere."""
    params, cfg = flat_model("tiny-openpangu")
    target = Model(params, cfg)
    other, _ = flat_model("tiny-openpangu", seed=1)
    plain = pf.generate(params, cfg, RAGGED[:1], 30, eos_token_ids=())[0].tokens
    P = len(RAGGED[0])

    class FirstRowLookup(PromptLookup):
        def propose(self, target, spec, k, sampling, rng):
            done = int(spec.lengths[0]) - P  # tokens row 0 has generated
            drafts = torch.zeros(len(spec.lengths), k, dtype=torch.int64)
            drafts[0] = torch.tensor(plain[done: done + k])
            return None, drafts, None, (torch.arange(len(spec.lengths)) == 0).long() * k

    drafter = LookupFirst(DraftModel(other, cfg), FirstRowLookup())
    rng = torch.Generator().manual_seed(0)
    state, _ = spec_init(target, drafter, RAGGED, 30, pf.SamplingParams(), rng, eos_token_ids=(), k=3)
    for _ in range(3):
        state, _, _ = spec_step(target, drafter, state, pf.SamplingParams(), rng)
        for row in range(len(state.rows)):
            tokens = state.tokens[row, : int(state.lengths[row])].tolist()
            assert_cache_equals_prefill(state.draft, row, other, cfg, tokens[: int(state.draft.lengths[row]) + 1])
    assert state.tokens[0, : int(state.lengths[0])].tolist() == RAGGED[0] + plain[: 1 + 3 * 4]  # all accepted

    sampling = pf.SamplingParams(temperature=1.0)
    state, _ = spec_init(target, drafter, RAGGED, 30, sampling, rng, eos_token_ids=(), k=3)
    _, drafts, q, counts = drafter.propose(target, state, 3, sampling, rng)
    assert torch.equal(q[0], torch.nn.functional.one_hot(drafts[0], cfg.vocab_size).to(q.dtype))
    assert counts.tolist() == [3] * len(RAGGED) and bool((q[1:].amax(-1) < 1).all())


def test_a_bf16_draft_model_runs_fused_and_prepacked_and_stays_exact():
    params, cfg = flat_model("tiny-openpangu")
    bf16 = pf.astype(drafter_for("draft", "tiny-openpangu").params, "bf16")
    drafter = DraftModel(bf16, cfg)
    assert all(isinstance(leaf, torch.Tensor) for leaf in flatten(bf16).values())  # the input is untouched
    assert set(block_linears(drafter.params)[:4]) == {"blocks.0.attn.qkv", "blocks.0.attn.o", "blocks.0.mlp.gate_up",
                                                      "blocks.0.mlp.down"}
    packed = [name for name, leaf in flatten(drafter.params).items() if isinstance(leaf, DenseWeight)]
    assert len(packed) == 4 * cfg.num_layers + 1 or not torch.backends.mkldnn.is_available()  # + the head
    plain = pf.generate(params, cfg, RAGGED, 12, eos_token_ids=())
    spec = speculative_generate(params, cfg, RAGGED, 12, eos_token_ids=(), drafter=drafter, k=3)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]


def test_draft_model_with_other_vocabulary_is_a_config_error():
    params, cfg = flat_model("tiny-openpangu")
    dparams, dcfg = flat_model("tiny-openpangu", vocab_size=300)
    with pytest.raises(pf.ConfigError, match="vocabulary"):
        speculative_generate(params, cfg, SINGLE, 4, drafter=(dparams, dcfg))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_an_input_error(k):
    params, cfg = flat_model("tiny-gpt")
    with pytest.raises(pf.InputError, match="k >= 1"):
        speculative_generate(params, cfg, SINGLE, 4, drafter="lookup", k=k)
    with pytest.raises(pf.InputError, match="k_max"):
        AdaptiveK(k_max=0)


@pytest.mark.parametrize("bad", [SelfDraft(layers=0), SelfDraft(layers=3), PromptLookup(max_ngram=0), "nope", 42,
                                 LookupFirst(PromptLookup()), LookupFirst(SelfDraft(layers=3))])
def test_bad_drafters_are_config_errors(bad):
    params, cfg = flat_model("tiny-gpt")  # 2 layers
    with pytest.raises(pf.ConfigError):
        speculative_generate(params, cfg, SINGLE, 4, drafter=bad)


def test_prompt_lookup_proposes_the_continuation_of_the_latest_match():
    params, cfg = flat_model("tiny-gpt")
    tokens = [[1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3], [8, 8, 8, 8], [10, 11, 12, 13]]
    n = max(map(len, tokens))
    buf = torch.tensor([t + [0] * (n - len(t)) for t in tokens])
    state = type("S", (), {"tokens": buf, "lengths": torch.tensor([len(t) for t in tokens])})
    _, drafts, probs, counts = PromptLookup().propose(Model(params, cfg), state, 5, pf.SamplingParams(), None)
    assert probs is None and counts.tolist() == [5, 5, 0]
    assert drafts[0].tolist() == [4, 5, 6, 7, 1]  # after the latest earlier "1 2 3"
    assert drafts[1].tolist() == [8, 8, 8, 8, 8]  # "8 8 8" matched one back: the repeat continues


def test_lookup_first_runs_the_model_only_when_a_row_does_not_repeat_itself():
    params, cfg = flat_model("tiny-gpt")
    calls = []

    class Fallback:  # records its calls and drafts zeros
        name = "stub"

        def propose(self, target, spec, k, sampling, rng):
            calls.append(k)
            return "state", torch.zeros(len(spec.lengths), k, dtype=torch.int64), None, None

    drafter = LookupFirst(Fallback())

    def propose(tokens):
        n = max(map(len, tokens))
        spec = SimpleNamespace(tokens=torch.tensor([t + [0] * (n - len(t)) for t in tokens]),
                               lengths=torch.tensor([len(t) for t in tokens]), draft="state")
        return drafter.propose(Model(params, cfg), spec, 3, pf.SamplingParams(), None)

    _, drafts, probs, counts = propose([[5, 6, 7, 5, 6], [1, 2, 1, 2]])
    assert calls == [] and probs is None and drafts.tolist() == [[7, 5, 6], [1, 2, 1]] and counts.tolist() == [3, 3]
    _, drafts, _, counts = propose([[5, 6, 7, 5, 6], [1, 2, 3, 2]])  # row 2 repeats only a 1-gram
    assert calls == [3] and drafts.tolist() == [[7, 5, 6], [0, 0, 0]] and counts.tolist() == [3, 3]
    assert drafter.name == "lookup+stub"


def test_adaptive_k_falls_back_to_plain_decoding_when_drafts_fail():
    ctl = AdaptiveK(k_max=6, timed=False, cost=0.1, memory=0.7)
    assert ctl.choose() == 6  # optimistic prior, cheap drafts
    ctl = replace(ctl, cost=0.3)
    for _ in range(6):  # every draft rejected
        ctl = ctl.update(max(ctl.choose(), 1), accepted=0, examined=1)
    assert ctl.choose() == 0 and ctl.rate < 0.1
    for _ in range(3):
        ctl = ctl.update(0, 0, 0)
    assert ctl.choose() == 0
    ctl = ctl.update(0, 0, 0)
    assert ctl.choose() == 1  # a probe after probe_every = 4 plain steps
    ctl = ctl.update(1, accepted=0, examined=1)
    for _ in range(7):
        ctl = ctl.update(0, 0, 0)
    assert ctl.choose() == 0  # a failed probe doubles the gap
    ctl = ctl.update(0, 0, 0)
    assert ctl.choose() == 1
    ctl = replace(ctl, cost=0.05)
    for _ in range(10):  # drafts are good again
        k = ctl.choose()
        ctl = ctl.update(k, accepted=k, examined=k)
    assert ctl.rate > 0.9 and ctl.choose() == 6 and ctl.backoff == 0


def test_adaptive_k_gives_drafts_the_benefit_of_one_accepted_draft():
    """It decodes plainly only when no K would pay even with `optimism` (1) more drafts counted
    as accepted. The expected speedups are worked out by hand."""
    ctl = AdaptiveK(k_max=1, timed=False, cost=0.3, overhead=0.2, accepted=0.5, examined=1.0)
    # a = 0.5, K = 1: (1 + 0.5) / (1.2 + 0.3) = 1.0, it pays exactly
    assert ctl.speedup(1) == pytest.approx(1.0) and ctl.choose() == 1
    ctl = replace(ctl, accepted=0.2, examined=2.0)  # a = 0.1: 1.1 / 1.5 = 0.73 ...
    assert ctl.speedup(1) == pytest.approx(1.1 / 1.5)
    # ... but with one more accepted draft a = 1.2 / 3 = 0.4: 1.4 / 1.5 = 0.93 < 1: plain
    assert ctl.speedup(1, 1.0) == pytest.approx(1.4 / 1.5) and ctl.choose() == 0
    ctl = replace(ctl, accepted=0.4)  # a = 0.2; with one more, 1.4 / 3: 1.467 / 1.5 = 0.98: plain
    assert ctl.choose() == 0
    assert replace(ctl, optimism=2.0).choose() == 1  # 2.4 / 4 = 0.6: 1.6 / 1.5 > 1
    assert replace(ctl, cost=2.0, accepted=1.9, optimism=100.0).choose() == 0  # (1 + a) / 3.2 < 1 for any a
    with pytest.raises(pf.InputError, match="optimism"):
        AdaptiveK(optimism=-1.0)


def test_timed_adaptive_k_uses_measured_costs():
    ctl = AdaptiveK(k_max=4, cost=1.0)
    assert ctl.choose() == 0  # first a plain step, to time it
    timed = ctl.update(0, 0, 0, draft_s=0.0, verify_s=0.010)
    assert timed.choose() == 1  # then a probe, to time drafting rather than trust the guess
    costly = timed.update(4, 4, 4, draft_s=0.040, verify_s=0.011)  # a draft token costs a plain step
    assert costly.rate > 0.9 and costly.choose() == 0  # not worth it at any acceptance rate
    cheap = timed.update(4, 4, 4, draft_s=0.004, verify_s=0.011)
    assert cheap.choose() == 4  # the measured cost overrides the structural guess
    noisy = cheap.update(4, 4, 4, draft_s=0.400, verify_s=0.011)  # one preempted step
    assert noisy.draft_s < 0.002 and noisy.choose() == 4


def test_a_warm_start_continues_from_the_last_calls_controller():
    """`SpecStats.adaptive` is the controller the call ended with; passed as the next call's
    `adaptive` it carries the measured rate on (here: drafts that fail, so the second call
    decodes plainly from its first step), and the tokens stay plain greedy's."""
    params, cfg = flat_model("tiny-openpangu")
    drafter = DraftModel(*flat_model("tiny-openpangu", seed=9))  # an unrelated model: drafts fail
    plain = [c.tokens for c in pf.generate(params, cfg, SINGLE, 40, eos_token_ids=())]
    cold = SpecStats()
    out = speculative_generate(params, cfg, SINGLE, 40, eos_token_ids=(), drafter=drafter, k=4,
                               adaptive=AdaptiveK(k_max=4, timed=False, cost=0.5), stats=cold)
    learnt = cold.adaptive
    assert [c.tokens for c in out] == plain and learnt.rate < 0.3 and learnt.examined > 2.0
    assert max(cold.k_used) >= 2  # the fresh controller's optimistic prior drafts at first
    warm = SpecStats()
    out = speculative_generate(params, cfg, SINGLE, 40, eos_token_ids=(), drafter=drafter, k=4,
                               adaptive=replace(learnt, plain_steps=0, backoff=3), stats=warm)
    assert [c.tokens for c in out] == plain
    assert set(warm.k_used) <= {0, 1} and warm.k_used.get(1, 0) <= 1  # plain, with at most one probe
    assert warm.adaptive.examined <= learnt.examined + 1


def test_adaptive_run_falls_back_when_drafts_are_useless():
    params, cfg = flat_model("tiny-openpangu")
    drafter = DraftModel(*flat_model("tiny-openpangu", seed=9))  # an unrelated model: drafts fail
    stats = SpecStats()
    out = speculative_generate(params, cfg, SINGLE, 40, eos_token_ids=(), drafter=drafter, k=4,
                               adaptive=AdaptiveK(k_max=4, timed=False, cost=0.5), stats=stats)
    assert [c.tokens for c in out] == [c.tokens for c in pf.generate(params, cfg, SINGLE, 40, eos_token_ids=())]
    assert stats.acceptance_rate < 0.2 and stats.k_used.get(0, 0) > stats.steps // 2
