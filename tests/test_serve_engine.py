"""The serving engine's step function, without HTTP: batch invariance (a request's tokens and
log-probabilities are bit-identical alone and among 15 others arriving at random steps), the
prefix cache (identical outputs with and without), stop rules, penalties against a by-hand
recomputation, chunked prefill, cancellation, queue limits."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf
from pangu_fn.errors import InputError
from pangu_fn.serve import EngineSettings, QueueFullError, Request, cancel, engine_step, init_engine, submit
from pangu_fn.serve.engine import run_requests
from pangu_fn.serve.text import ids_text

DEMO = "models/demo/target"


def model(name: str):
    return pf.load(DEMO, dtype="fp32") if name == "demo" else random_model(name)


def mixed_requests(cfg, n: int, rng: random.Random, prefix: tuple[int, ...] = (), longest: int = 40,
                   most_tokens: int = 10) -> list[Request]:
    """Greedy and seeded requests of random prompt lengths, some with penalties and top-k / top-p."""
    out = []
    for i in range(n):
        prompt = prefix + tuple(rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(1, longest)))
        sampling = pf.SamplingParams() if i % 2 == 0 else pf.SamplingParams(
            temperature=rng.choice([0.7, 1.0, 1.3]), top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]),
            repetition_penalty=rng.choice([1.0, 1.2]))
        out.append(Request(f"r{i}", prompt, rng.randint(1, most_tokens), sampling, seed=1000 + i, logprobs=2,
                           presence_penalty=rng.choice([0.0, 0.5]), frequency_penalty=rng.choice([0.0, 0.3])))
    return out


def outputs(events):
    """Tokens and (exact) log-probabilities of each request."""
    return {k: [(e.token, e.logprob, e.top_logprobs, e.finish_reason) for e in evs] for k, evs in events.items()}


@pytest.mark.parametrize("name", [*FAMILIES, "demo"])
def test_tokens_do_not_depend_on_the_batch(name):
    params, cfg = model(name)
    rng = random.Random(0)
    demo = name == "demo"  # the slowest model here: shorter requests
    requests = mixed_requests(cfg, 16, rng, longest=12 if demo else 24, most_tokens=4 if demo else 6)
    settings = EngineSettings(max_batch=16, prefill_chunk=8)  # prompts longer than 8 prefill in chunks
    alone = {}
    for q in requests:
        _, ev = run_requests(init_engine(params, cfg, settings), params, cfg, [q])
        alone.update(ev)
    arrivals = [rng.randrange(0, 6 if demo else 8) for _ in requests]
    state, together = run_requests(init_engine(params, cfg, settings), params, cfg, requests, arrivals)
    assert outputs(together) == outputs(alone)
    assert state.idle and state.counters.finished == 16
    assert state.counters.generated_tokens == sum(len(v) for v in alone.values())


def test_a_single_greedy_request_matches_generate():
    params, cfg = model("demo")
    prompt = list(range(20, 36))
    ref = pf.generate(params, cfg, [prompt], 8, eos_token_ids=())[0].tokens
    for invariant in (True, False):
        _, ev = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4, invariant=invariant)),
                             params, cfg, [Request("a", tuple(prompt), 8)])
        assert [e.token for e in ev["a"]] == ref


def test_prefix_cache_gives_identical_outputs():
    params, cfg = model("tiny-openpangu")
    rng = random.Random(1)
    system = tuple(rng.randrange(3, cfg.vocab_size) for _ in range(30))
    requests = mixed_requests(cfg, 8, rng, prefix=system)
    arrivals = [2 * i for i in range(8)]
    _, plain = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4, prefill_chunk=8)),
                            params, cfg, requests, arrivals)
    state, cached = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4, prefill_chunk=8, prefix_cache=200)),
                                 params, cfg, requests, arrivals)
    assert outputs(cached) == outputs(plain)
    assert state.prefix.hits >= 4 and state.counters.cached_tokens >= 4 * 30 and state.prefix.held <= 200
    assert cached["r0"][0].cached_tokens == 0
    assert sum(evs[0].cached_tokens for evs in cached.values()) == state.counters.cached_tokens


def test_prefix_cache_is_bounded_lru():
    params, cfg = model("tiny-gpt")
    state = init_engine(params, cfg, EngineSettings(max_batch=2, prefix_cache=50))
    prompts = [tuple(range(10 + i, 30 + i)) for i in range(0, 100, 20)]  # 5 disjoint prompts of 20 tokens
    state, _ = run_requests(state, params, cfg, [Request(f"p{i}", p, 2) for i, p in enumerate(prompts)])
    assert state.prefix.held <= 50 and list(state.prefix.entries) == [prompts[-2], prompts[-1]]


def recompute_choice(params, cfg, tokens, generated, req):
    """The greedy token a by-hand application of the penalties picks after `tokens`."""
    with torch.inference_mode():
        logits = pf.forward(params, cfg, torch.tensor([tokens]))[0][0, -1].float()
    counts = torch.zeros_like(logits)
    for t in generated:
        counts[t] += 1
    logits = logits - req.frequency_penalty * counts - req.presence_penalty * (counts > 0).float()
    p = req.sampling.repetition_penalty
    for t in set(tokens):
        logits[t] = logits[t] / p if logits[t] > 0 else logits[t] * p
    return int(logits.argmax())


@pytest.mark.parametrize("penalties", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                                       {"sampling": pf.SamplingParams(repetition_penalty=3.0)}])
def test_penalties_match_a_recomputation(penalties):
    params, cfg = model("tiny-gpt")
    req = Request("a", (40, 41, 42, 43), 12, **penalties)
    _, ev = run_requests(init_engine(params, cfg, EngineSettings(max_batch=2)), params, cfg, [req])
    got = [e.token for e in ev["a"]]
    for i, tok in enumerate(got):
        assert tok == recompute_choice(params, cfg, list(req.prompt) + got[:i], got[:i], req)
    plain = run_requests(init_engine(params, cfg, EngineSettings(max_batch=2)), params, cfg,
                         [Request("a", req.prompt, 12)])[1]["a"]
    assert got != [e.token for e in plain]  # the penalty changed something


def test_stop_string_split_across_tokens_and_eos():
    params, cfg = model("tiny-openpangu")
    prompt = tuple(range(40, 60))
    _, ref = run_requests(init_engine(params, cfg), params, cfg, [Request("a", prompt, 10)])
    tokens = [e.token for e in ref["a"]]
    text = ids_text(tokens)
    boundary = len(ids_text(tokens[:4]))  # the stop string straddles tokens 4 and 5
    stop = text[boundary - 1:boundary + 2]
    _, ev = run_requests(init_engine(params, cfg), params, cfg, [Request("b", prompt, 10, stop=(stop,))])
    got = "".join(e.text for e in ev["b"])
    assert got == text[:text.find(stop)] and ev["b"][-1].finish_reason == "stop"
    assert stop not in got
    _, ev = run_requests(init_engine(params, cfg), params, cfg, [Request("c", prompt, 10, eos=frozenset({tokens[2]}))])
    first = tokens.index(tokens[2])
    assert [e.token for e in ev["c"]] == tokens[:first + 1] and ev["c"][-1].finish_reason == "stop"
    assert ref["a"][-1].finish_reason == "length" and len(ref["a"]) == 10


def test_chunked_prefill_never_stalls_a_running_stream():
    params, cfg = model("tiny-openpangu")
    state = init_engine(params, cfg, EngineSettings(max_batch=2, prefill_chunk=8))
    state = submit(state, Request("short", (5, 6, 7), 30), cfg)
    state, _ = engine_step(state, params, cfg)
    state = submit(state, Request("long", tuple(range(10, 90)), 2), cfg)
    for _ in range(10):  # the long prompt needs 10 chunks of 8; the short one gets a token every step
        state, events = engine_step(state, params, cfg)
        assert [e.id for e in events if e.token is not None][:1] == ["short"]


def test_cancel_frees_the_slot_and_queue_limits():
    params, cfg = model("tiny-gpt")
    state = init_engine(params, cfg, EngineSettings(max_batch=1, max_queue=3))
    state = submit(state, Request("a", (5, 6), 50), cfg)
    state = submit(state, Request("b", (5, 6), 50, deadline=0.0), cfg)
    state = submit(state, Request("c", (5, 6), 50), cfg)
    with pytest.raises(QueueFullError, match="max_queue 3"):
        submit(state, Request("d", (5, 6), 50), cfg)
    state, events = engine_step(state, params, cfg, now=1.0)
    assert [(e.id, e.finish_reason) for e in events] == [("b", "timeout"), ("a", None)]
    state, _ = engine_step(cancel(state, "a"), params, cfg)
    assert state.slots[0].request.id == "c"  # a's slot went to c in the same step
    state, events = engine_step(cancel(state, "c"), params, cfg)
    assert [(e.id, e.finish_reason) for e in events] == [("c", "cancelled")] and state.idle
    assert state.counters.cancelled == 2 and state.counters.timed_out == 1
    with pytest.raises(InputError, match="100 tokens and max_tokens is 100: 200 positions, beyond the 126"):
        submit(state, Request("e", (5,) * 100, 100), cfg)
    with pytest.raises(InputError, match="token id 999"):
        submit(state, Request("f", (999,), 1), cfg)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_tree_serves_as_generate_decodes_it(scheme):
    params, cfg = pf.load(DEMO)
    params = pf.quantize(params, pf.QuantRecipe(scheme=scheme, compute_dtype="fp32"), cfg)  # fp32 activations
    prompts = [list(range(20 + i, 36 + i)) for i in range(3)]
    _, ev = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4)), params, cfg,
                         [Request(str(i), tuple(p), 6) for i, p in enumerate(prompts)])
    ref = pf.generate(params, cfg, prompts, 6, eos_token_ids=())
    assert [[e.token for e in ev[str(i)]] for i in range(3)] == [c.tokens for c in ref]
