"""Speculative decoding on the committed demo pair (models/demo/target and models/demo/draft,
trained by `pangu train-demo`): greedy output equals plain greedy `generate` token for token
with every drafter, for a single held-out prompt and a ragged batch, and the distilled draft
model's drafts are accepted far more often than chance. Loaded in fp32, so that batched and
one-token scoring agree to ~1e-6; in bf16 (as stored) they may differ only at ties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pangu_fn as pf
from pangu_fn.data import read_documents
from pangu_fn.speculative import DraftModel, LookupFirst, SpecStats, speculative_generate
from pangu_fn.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
@pytest.fixture(scope="module")
def demo():
    target = pf.load(DEMO / "target", dtype="fp32")
    draft = pf.load(DEMO / "draft", dtype="fp32")
    tokenizer = load_tokenizer(DEMO / "target")
    docs = read_documents(DEMO / "heldout.jsonl")
    prompts = [tokenizer.encode(d.text)[:n] for d, n in zip(docs[:3], (40, 17, 29))]
    return target, draft, prompts


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small spend their time in per-op overhead; a thread pool only adds to it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("drafter", ["draft", "self", "lookup", "lookup+draft"])
def test_demo_greedy_equals_plain_greedy(demo, drafter):
    (params, cfg), draft, prompts = demo
    drafter = {"draft": DraftModel(*draft), "lookup+draft": LookupFirst(DraftModel(*draft))}.get(drafter, drafter)
    for batch in (prompts[:1], prompts):
        plain = pf.generate(params, cfg, batch, 40)
        for k, adaptive in [(4, False), (6, True)]:
            spec = speculative_generate(params, cfg, batch, 40, drafter=drafter, k=k, adaptive=adaptive)
            assert [(c.tokens, c.finish_reason) for c in spec] == [(c.tokens, c.finish_reason) for c in plain]


def test_demo_draft_is_accepted_often(demo):
    (params, cfg), draft, prompts = demo
    stats = SpecStats()
    speculative_generate(params, cfg, prompts, 40, eos_token_ids=(), drafter=DraftModel(*draft), k=4, stats=stats)
    assert stats.acceptance_rate > 0.3, stats.summary()  # chance agreement over 4096 tokens is ~0


def test_demo_bf16_differs_from_plain_greedy_only_at_ties():
    """As stored (bf16), scoring K + 1 positions in one call rounds differently from scoring
    one, so where two tokens' logits are within bf16's resolution (2^-5 at magnitudes 4-8) the
    argmax may differ. Every divergence from plain greedy must be such a tie in the exact
    (fp32) model: the two tokens' fp32 logits within two bf16 steps (0.0625)."""
    params, cfg = pf.load(DEMO / "target")
    exact, _ = pf.load(DEMO / "target", dtype="fp32")
    tokenizer = load_tokenizer(DEMO / "target")
    prompts = [tokenizer.encode(d.text)[:24] for d in read_documents(DEMO / "heldout.jsonl")[:12]]
    plain = pf.generate(params, cfg, prompts, 48, eos_token_ids=())
    for drafter in (DraftModel(*pf.load(DEMO / "draft")), "lookup"):
        spec = speculative_generate(params, cfg, prompts, 48, eos_token_ids=(), drafter=drafter, k=4)
        for prompt, a, b in zip(prompts, plain, spec):
            at = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)
            if at is None:
                continue
            logits, _ = pf.forward(exact, cfg, torch.tensor([prompt + a.tokens[:at]]))
            gap = (logits[0, -1, a.tokens[at]] - logits[0, -1, b.tokens[at]]).abs().item()
            assert gap < 0.0625, f"divergence at token {at} is not a tie: fp32 logit gap {gap:.4f}"
