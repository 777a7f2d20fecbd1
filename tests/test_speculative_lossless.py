"""Speculative sampling is lossless: on a vocabulary of 8 tokens, the joint distribution of the
first three generated tokens over many independent rows matches the exact distribution of
plain sampling, computed from full-sequence logits (no cache, no speculation) and the sampler's
own definition of the distribution (`penalize`, `probabilities`).

The statistic is Pearson's chi-square over the joint cells (cells expecting fewer than 5
counts are merged), compared with its 0.999 quantile. To show that this bound has power, the
same test runs with the seed's acceptance rule (keep a draft iff p_target(draft) >= 0.8,
then a fresh sample from p), which must fail it, for every sampling setting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils._pytree as pytree
from helpers import random_model

import pangu_fn as pf
from pangu_fn.sampling import penalize, probabilities
from pangu_fn.speculative import DraftModel, LookupFirst, PromptLookup, SelfDraft, accept, speculative_generate

V = 8
PROMPT = [3, 1, 4, 1, 5, 3, 1, 4]  # repeats, so prompt lookup proposes drafts
ROWS = 8000


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of rows through a 16-wide model: one thread avoids the pool's overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model() -> tuple[dict, pf.ModelConfig]:
    """A 2-layer, vocabulary-8 openPangu model with sharpened logits: at temperature 1 about
    60% of its next-token distributions put >= 0.8 on one token (median top probability
    0.87), the region where the seed's rule misbehaves."""
    params, cfg = random_model("tiny-openpangu", seed=0, vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=8, intermediate_size=32)
    params["tok_embed"] = {"weight": params["tok_embed"]["weight"] * 0.5}
    params["final_norm"] = {"weight": params["final_norm"]["weight"] * 2.0}
    return params, cfg


def perturbed(params: dict, seed: int = 5, noise: float = 0.5) -> dict:
    """The draft model: the target with every matrix perturbed by `noise` times its std."""
    gen = torch.Generator().manual_seed(seed)
    return pytree.tree_map(lambda t: t + noise * t.std() * torch.randn(t.shape, generator=gen) if t.dim() == 2 else t,
                    params)


def exact_joint(params, cfg, sp: pf.SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) `[V, V, V]` of plain sampling, from full-sequence logits of all V^2 prefixes."""
    prefixes = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
    logits, _ = pf.forward(params, cfg, prefixes)
    n = len(PROMPT)
    joint = torch.ones(V, V, V, dtype=torch.float64)
    for step in range(3):
        seen = torch.zeros(V * V, V, dtype=torch.bool)
        seen[:, PROMPT] = True
        for j in range(step):
            seen.scatter_(1, prefixes[:, n + j, None], True)
        probs = probabilities(penalize(logits[:, n - 1 + step].float(), seen, sp.repetition_penalty), sp)
        probs = probs.double().view(V, V, V)  # [t1, t2, next]
        if step == 0:
            joint *= probs[0, 0][:, None, None]
        elif step == 1:
            joint *= probs[:, 0, :][:, :, None]
        else:
            joint *= probs
    return joint


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic with cells expecting < 5 merged into one; returns (statistic, dof)."""
    counts, expected = counts.flatten().double(), expected.flatten()
    small = expected < 5
    c = torch.cat([counts[~small], counts[small].sum()[None]])
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def chi_square_bound(dof: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(dof), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def threshold_rule(target_probs, draft_probs, drafts, counts, rng):
    """The seed's rule, deliberately wrong: keep drafts while p_target(draft) >= 0.8, then draw
    the next token from p_target."""
    B, K = drafts.shape
    p_draft = target_probs[:, :K].gather(-1, drafts[..., None]).squeeze(-1)
    ok = (p_draft >= 0.8) & (torch.arange(K) < counts[:, None])
    accepted = ok.long().cumprod(1).sum(1)
    return accepted, torch.multinomial(target_probs[torch.arange(B), accepted], 1, generator=rng).squeeze(-1)


def sampled_joint(params, cfg, drafter, sp: pf.SamplingParams, seed: int) -> torch.Tensor:
    out = speculative_generate(params, cfg, [PROMPT] * ROWS, 5, sp, seed=seed, eos_token_ids=(),
                               drafter=drafter, k=3)
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    for c in out:
        counts[tuple(c.tokens[:3])] += 1
    return counts


SETTINGS = [
    ("draft", pf.SamplingParams(temperature=1.0)),
    ("draft", pf.SamplingParams(temperature=0.7, top_k=3)),
    ("draft", pf.SamplingParams(temperature=2.0, top_k=4, top_p=0.95)),
    ("draft", pf.SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.2)),
    ("self", pf.SamplingParams(temperature=1.5, top_k=5)),
    ("lookup", pf.SamplingParams(temperature=0.8, top_k=4)),
    ("lookup", pf.SamplingParams(temperature=1.0)),
    ("lookup+draft", pf.SamplingParams(temperature=1.2, top_k=5)),
]


@pytest.mark.parametrize("drafter,sp", SETTINGS, ids=[f"{d}-{i}" for i, (d, _) in enumerate(SETTINGS)])
def test_speculative_sampling_matches_plain_sampling(drafter, sp, monkeypatch):
    params, cfg = small_model()
    drafter = {"draft": DraftModel(perturbed(params), cfg), "self": SelfDraft(layers=1),
               "lookup": PromptLookup(), "lookup+draft": LookupFirst(DraftModel(perturbed(params), cfg))}[drafter]
    expected = exact_joint(params, cfg, sp) * ROWS
    stat, dof = chi_square(sampled_joint(params, cfg, drafter, sp, seed=1), expected)
    bound = chi_square_bound(dof)
    assert stat < bound, f"speculative sampling: chi2 {stat:.1f} >= {bound:.1f} (dof {dof})"
    monkeypatch.setattr(accept, "rejection_sample", threshold_rule)
    wrong, dof = chi_square(sampled_joint(params, cfg, drafter, sp, seed=1), expected)
    assert wrong > chi_square_bound(dof), f"the test has no power here: seed's rule chi2 {wrong:.1f}"


def test_exact_joint_is_a_distribution_and_plain_sampling_matches_it():
    """The reference itself against plain `generate`, one seed per row."""
    params, cfg = small_model()
    sp = pf.SamplingParams(temperature=1.3, top_k=5, repetition_penalty=1.2)
    joint = exact_joint(params, cfg, sp)
    assert abs(joint.sum().item() - 1) < 1e-5
    out = pf.generate(params, cfg, [PROMPT] * 4000, 3, sp, seed=3, eos_token_ids=())
    counts = torch.zeros(V, V, V, dtype=torch.float64)
    for c in out:
        counts[tuple(c.tokens)] += 1
    stat, dof = chi_square(counts, joint * 4000)
    assert dof >= 10 and stat < chi_square_bound(dof)
