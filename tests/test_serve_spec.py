"""Speculative decoding inside the serving engine (the step function, and once through HTTP).

Greedy requests drafted by a draft model, lookup, lookup + a draft model or the target's own
first layer give exactly the tokens of the engine without a drafter (arriving at random steps,
fp32); seeded sampled requests with a drafter give the same tokens alone and in a batch; the
prefix cache and cancellation work with a drafter; pruned trees serve as `generate` decodes them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import httpx
import openai
import pytest
import torch
from helpers import random_model
from pangu_tools.cli import main
from serve_server import running_server

import pangu_fn as pf
from pangu_fn.prune import PruneRecipe, prune
from pangu_fn.serve import EngineSettings, Request, cancel, engine_step, init_engine, submit
from pangu_fn.serve.app import Served, ServerOptions
from pangu_fn.serve.engine import run_requests
from pangu_fn.speculative import DraftModel, LookupFirst, SpecStats, load_drafter, speculative_generate
from pangu_fn.tokenizer import load_tokenizer

DEMO = Path("models/demo/target")
DRAFT = "models/demo/draft"
SETTINGS = EngineSettings(max_batch=8, prefill_chunk=16)


@pytest.fixture(scope="module")
def demo():
    return pf.load(DEMO, dtype="fp32")


@pytest.fixture(scope="module")
def tiny():
    """tiny-openpangu and a one-layer draft of the same vocabulary (other random weights)."""
    params, cfg = random_model("tiny-openpangu")
    return params, cfg, DraftModel(*random_model("tiny-openpangu", seed=1, num_layers=1))


def heldout_prompts(n: int, rng: random.Random, longest: int) -> list[tuple[int, ...]]:
    """Slices of the demo's held-out text (natural text: lookup and the draft model find things)."""
    tok = load_tokenizer(DEMO)
    texts = [json.loads(line)["text"] for line in (DEMO.parent / "heldout.jsonl").read_text().splitlines()]
    ids = [t for text in texts[:20] for t in tok.encode(text)]
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(ids) - longest)
        out.append(tuple(ids[start:start + rng.randint(6, longest)]))
    return out


def requests(prompts, rng: random.Random, most_tokens: int, sampled: bool = False,
             temperatures: tuple[float, ...] = (0.7, 1.0)) -> list[Request]:
    """Greedy requests (some with penalties); with `sampled`, every other one seeded sampling."""
    out = []
    for i, p in enumerate(prompts):
        kw = {}
        if i % 3 == 1:
            kw = {"presence_penalty": 0.5, "frequency_penalty": 0.3}
        elif i % 3 == 2:
            kw = {"sampling": pf.SamplingParams(repetition_penalty=1.2)}
        if sampled and i % 2:
            kw["sampling"] = pf.SamplingParams(temperature=rng.choice(temperatures), top_k=rng.choice([0, 20]),
                                               repetition_penalty=rng.choice([1.0, 1.2]))
        out.append(Request(f"r{i}", p, rng.randint(2, most_tokens), seed=100 + i, logprobs=1, **kw))
    return out


def outputs(events):
    return {k: [(e.token, e.finish_reason) for e in evs] for k, evs in events.items()}


@pytest.mark.heavy
def test_greedy_drafting_equals_the_engine_without_a_drafter_demo(demo):
    params, cfg = demo
    rng = random.Random(0)
    tok = load_tokenizer(DEMO)
    repeats = [tuple(tok.encode(f"def {f}(a, b):\n    return a + b\n\ndef {f}(a, b):\n")) for f in ("add", "mul")]
    reqs = requests(heldout_prompts(8, rng, 16), rng, 6)
    reqs += [Request(f"repeat{i}", p, 8) for i, p in enumerate(repeats)]  # lookup finds their continuations
    arrivals = [rng.randrange(0, 4) for _ in reqs]
    _, plain = run_requests(init_engine(params, cfg, SETTINGS), params, cfg, reqs, arrivals)
    for drafter in (DRAFT, "lookup", f"lookup+{DRAFT}"):
        state, got = run_requests(init_engine(params, cfg, SETTINGS, drafter=drafter), params, cfg, reqs, arrivals)
        assert outputs(got) == outputs(plain), drafter
        c = state.counters
        assert 0 < c.accepted_tokens <= c.draft_tokens and c.generated_tokens == sum(map(len, plain.values()))
        for q in reqs:  # log-probabilities of drafted positions: those of the plain decode
            want = [e.logprob for e in plain[q.id]]
            assert [e.logprob for e in got[q.id]] == (pytest.approx(want, abs=1e-4) if q.logprobs is not None else want)


@pytest.mark.parametrize("drafter", ["self:1", "lookup", "model"])
def test_greedy_drafting_equals_the_engine_without_a_drafter_tiny(tiny, drafter):
    params, cfg, draft_model = tiny
    rng = random.Random(1)
    prompts = [tuple(rng.randrange(3, cfg.vocab_size) for _ in range(rng.randint(2, 30))) for _ in range(12)]
    reqs = requests(prompts, rng, 12)
    arrivals = [rng.randrange(0, 8) for _ in reqs]
    settings = EngineSettings(max_batch=6, prefill_chunk=8)
    _, plain = run_requests(init_engine(params, cfg, settings), params, cfg, reqs, arrivals)
    state, got = run_requests(init_engine(params, cfg, settings, drafter=draft_model if drafter == "model" else drafter,
                                          k=3), params, cfg, reqs, arrivals)
    assert outputs(got) == outputs(plain)
    assert state.counters.draft_tokens > 0 and state.idle


@pytest.mark.parametrize("drafter", ["model", "lookup+model", "model-no-invariant"])
def test_seeded_drafting_is_batch_invariant(tiny, drafter):
    params, cfg, draft_model = tiny
    rng = random.Random(2)
    prompts = [tuple(rng.randrange(3, 40) for _ in range(rng.randint(2, 20))) for _ in range(10)]  # repeats: lookup hits
    reqs = requests(prompts, rng, 8, sampled=True, temperatures=(2.0, 4.0))  # flat: the draws matter
    invariant = drafter != "model-no-invariant"
    settings = EngineSettings(max_batch=10, prefill_chunk=8, invariant=invariant)
    spec = LookupFirst(draft_model) if drafter.startswith("lookup+") else draft_model

    def engine():
        return init_engine(params, cfg, settings, drafter=spec, k=4)

    alone = {}
    for q in reqs:
        alone.update(run_requests(engine(), params, cfg, [q])[1])
    state, together = run_requests(engine(), params, cfg, reqs, [rng.randrange(0, 6) for _ in reqs])
    if invariant:
        assert {k: [(e.token, e.logprob) for e in v] for k, v in together.items()} == \
               {k: [(e.token, e.logprob) for e in v] for k, v in alone.items()}
    else:  # last bits may differ with the batch: greedy tokens agree, sampled ones need not
        assert all(outputs(together)[q.id] == outputs(alone)[q.id] for q in reqs if q.sampling.greedy)
    assert state.counters.accepted_tokens > 0


@pytest.mark.parametrize("penalties", [{"presence_penalty": 2.0, "frequency_penalty": 1.0},
                                       {"sampling": pf.SamplingParams(repetition_penalty=3.0)}])
def test_a_draft_equal_to_the_target_is_accepted(tiny, penalties):
    """The target's own layers as the draft model propose the target's tokens: nearly every draft
    is accepted (the draft cache follows the rows), and strong penalties, applied at each drafted
    position as if the drafts before it were generated, keep the plain engine's tokens."""
    params, cfg, _ = tiny
    rng = random.Random(5)
    reqs = [Request(f"r{i}", tuple(rng.randrange(3, 60) for _ in range(rng.randint(2, 20))), 12, **penalties)
            for i in range(6)]
    settings = EngineSettings(max_batch=6, prefill_chunk=8)
    _, plain = run_requests(init_engine(params, cfg, settings), params, cfg, reqs, [0, 0, 1, 2, 2, 5])
    state, got = run_requests(init_engine(params, cfg, settings, drafter=f"self:{cfg.num_layers}", k=4), params, cfg,
                              reqs, [0, 0, 1, 2, 2, 5])
    assert outputs(got) == outputs(plain)
    assert state.counters.accepted_tokens >= 0.9 * state.counters.draft_tokens > 0


def test_drafts_and_acceptance_match_speculative_generate(demo):
    """A request alone drafts and accepts what `speculative_generate` does with the same draft
    model: the draft cache follows the row through rollbacks."""
    params, cfg = demo
    prompt = heldout_prompts(1, random.Random(7), 16)[0]  # some drafts rejected: rollbacks
    stats = SpecStats()
    ref = speculative_generate(params, cfg, [list(prompt)], 20, eos_token_ids=(), drafter=load_drafter(DRAFT, dtype="fp32"), k=4,
                               stats=stats)[0].tokens
    state, ev = run_requests(init_engine(params, cfg, SETTINGS, drafter=DRAFT, k=4), params, cfg,
                             [Request("a", prompt, 20)])
    assert [e.token for e in ev["a"]] == ref
    assert (state.counters.draft_tokens, state.counters.accepted_tokens) == (stats.drafted, stats.accepted)
    assert 0 < stats.accepted < stats.drafted


def test_seeded_drafting_is_batch_invariant_demo(demo):
    params, cfg = demo
    rng = random.Random(8)
    reqs = [Request(f"s{i}", p, 10, pf.SamplingParams(temperature=1.0, top_k=rng.choice([0, 40])), seed=i)
            for i, p in enumerate(heldout_prompts(5, rng, 16))]
    alone = {}
    for q in reqs:
        alone.update(run_requests(init_engine(params, cfg, SETTINGS, drafter=DRAFT), params, cfg, [q])[1])
    state, together = run_requests(init_engine(params, cfg, SETTINGS, drafter=DRAFT), params, cfg, reqs, [0, 2, 2, 3, 5])
    assert outputs(together) == outputs(alone)
    assert 0 < state.counters.accepted_tokens < state.counters.draft_tokens


def test_prefix_cache_with_a_drafter(tiny):
    params, cfg, draft_model = tiny
    rng = random.Random(3)
    system = tuple(rng.randrange(3, 40) for _ in range(40))
    reqs = requests([system + tuple(rng.randrange(3, 40) for _ in range(rng.randint(1, 10))) for _ in range(6)], rng, 6,
                    sampled=True)
    arrivals = [2 * i for i in range(len(reqs))]
    settings = EngineSettings(max_batch=4, prefill_chunk=16)
    _, plain = run_requests(init_engine(params, cfg, settings, drafter=draft_model), params, cfg, reqs, arrivals)
    state, cached = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4, prefill_chunk=16, prefix_cache=256),
                                             drafter=draft_model), params, cfg, reqs, arrivals)
    assert outputs(cached) == outputs(plain)
    assert state.counters.cached_tokens >= 4 * 40 and state.counters.accepted_tokens > 0
    _, undrafted = run_requests(init_engine(params, cfg, settings), params, cfg, reqs, arrivals)
    assert all(outputs(cached)[q.id] == outputs(undrafted)[q.id] for q in reqs if q.sampling.greedy)


def test_cancelling_a_drafting_request_frees_its_draft_slot(tiny):
    params, cfg, draft_model = tiny
    prompt, other = tuple(range(30, 50)), tuple(range(60, 70))
    state = init_engine(params, cfg, EngineSettings(max_batch=1), drafter=draft_model)
    state = submit(submit(state, Request("a", prompt, 40), cfg), Request("b", other, 6), cfg)
    for _ in range(3):
        state, _ = engine_step(state, params, cfg)
    assert state.slots[0].request.id == "a" and state.slots[0].draft_computed > len(prompt)
    state, events = engine_step(cancel(state, "a"), params, cfg)  # b takes a's slot in the same step
    assert (events[0].id, events[0].finish_reason) == ("a", "cancelled")
    assert state.slots[0].request.id == "b" and state.slots[0].draft_computed <= len(other)
    got = [e.token for e in events[1:]]
    while not state.idle:
        state, events = engine_step(state, params, cfg)
        got += [e.token for e in events]
    alone = run_requests(init_engine(params, cfg, EngineSettings(max_batch=1)), params, cfg, [Request("b", other, 6)])[1]
    assert got == [e.token for e in alone["b"]]  # the stale draft row of a changed nothing
    assert state.counters.cancelled == 1 and state.running == 0


def test_logits_index_with_several_positions_per_row(tiny):
    params, cfg, _ = tiny
    tokens = torch.randint(3, cfg.vocab_size, (3, 7))
    index = torch.tensor([[0, 3, 6], [2, 2, 5], [6, 1, 0]])
    full, _ = pf.forward(params, cfg, tokens)
    some, _ = pf.forward(params, cfg, tokens, logits_index=index)
    torch.testing.assert_close(some, full[torch.arange(3)[:, None], index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", [PruneRecipe("structured", remove_heads={0: (1,)}, remove_neurons={1: (0, 5, 77)}),
                                    PruneRecipe("n:m", n=2, m=4)], ids=["structured", "2:4"])
def test_a_pruned_tree_serves_as_generate_decodes_it(tmp_path, recipe):
    params, cfg = random_model("tiny-openpangu")
    pruned, _ = prune(params, recipe, cfg=cfg)
    pf.save(tmp_path / "pruned", pruned, cfg)
    params, cfg = pf.load(tmp_path / "pruned")  # a pruned folder, as `pangu serve` loads it
    if recipe.method == "structured":
        assert params["blocks"][0]["attn"]["o"]["weight"].shape[1] < cfg.num_heads * cfg.head_dim
    prompts = [list(range(20 + 3 * i, 30 + 4 * i)) for i in range(4)]
    _, ev = run_requests(init_engine(params, cfg, EngineSettings(max_batch=4, prefill_chunk=8)), params, cfg,
                         [Request(str(i), tuple(p), 6) for i, p in enumerate(prompts)], arrivals=[0, 1, 1, 3])
    for i, p in enumerate(prompts):  # one by one
        assert [e.token for e in ev[str(i)]] == pf.generate(params, cfg, [p], 6, eos_token_ids=())[0].tokens


def test_http_completions_with_lookup_drafting(demo):
    params, cfg = demo
    tok = load_tokenizer(DEMO)
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"
    with running_server(lambda: Served("demo", params, cfg, tok, drafter="lookup"),
                        ServerOptions(EngineSettings(max_batch=4, prefill_chunk=32))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        out = client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
        text = httpx.get(f"{url}/metrics").text
    eos = {cfg.eos_token_id, tok.eos_id}
    tokens = pf.generate(params, cfg, [tok.encode(prompt)], 12, eos_token_ids=eos)[0].tokens
    assert out.choices[0].text == tok.decode([t for t in tokens if t not in eos])
    drafted = float(re.search(r"^pangu_spec_draft_tokens_total (\S+)$", text, re.MULTILINE).group(1))
    accepted = float(re.search(r"^pangu_spec_accepted_tokens_total (\S+)$", text, re.MULTILINE).group(1))
    assert drafted > 0 and 0 < accepted <= drafted


@pytest.mark.parametrize(("args", "message"), [(["--draft", "nonsense"], "--draft 'nonsense': expected 'self'"),
                                               (["--draft", "lookup", "--k", "0"], "expected an int draft length k >= 1")])
def test_bad_draft_options_exit_2_on_one_line(capsys, args, message):
    assert main(["serve", "tiny-gpt", "--port", "0", *args]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
