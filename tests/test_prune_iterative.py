"""Iterative pruning: the cubic schedule's values, exact targets in every round, masks kept through
recovery, and (on the trained demo model) lower perplexity with recovery than without."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import random_model

import pangu_fn as pf
from pangu_fn.errors import ConfigError
from pangu_fn.params import layer_sizes
from pangu_fn.prune import PruneRecipe, count_for, cubic_sparsity, prune
from pangu_fn.prune.schedule import distill_loss
from pangu_fn.prune.scope import get, scope_names

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"


def test_cubic_schedule_matches_hand_computed_values():
    # s_t = s_f + (s_i - s_f) * (1 - t/n)^3 with s_i = 0, s_f = 0.8, n = 4:
    # t=1: 0.8 * (1 - 27/64) = 0.4625; t=2: 0.8 * (1 - 1/8) = 0.7; t=3: 0.8 * (1 - 1/64) = 0.7875
    assert [cubic_sparsity(t, 4, 0.8) for t in range(5)] == pytest.approx([0.0, 0.4625, 0.7, 0.7875, 0.8], abs=1e-12)
    # with s_i = 0.2, s_f = 0.6, n = 2: t=1: 0.6 - 0.4 / 8 = 0.55
    assert cubic_sparsity(1, 2, 0.6, 0.2) == pytest.approx(0.55, abs=1e-12)
    assert cubic_sparsity(0, 2, 0.6, 0.2) == 0.2 and cubic_sparsity(7, 7, 0.55) == 0.55
    values = [cubic_sparsity(t, 10, 0.9) for t in range(11)]
    assert all(b >= a for a, b in itertools.pairwise(values))  # monotone
    assert all(b - a <= a - z + 1e-12 for z, a, b in zip(values, values[1:], values[2:]))  # steps shrink
    with pytest.raises(ConfigError):
        cubic_sparsity(5, 4, 0.5)


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_iterative_reaches_each_round_target_exactly_with_recovery(granularity):
    params, cfg = random_model("tiny-openpangu")
    calib = torch.randint(0, cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    recipe = PruneRecipe("iterative", sparsity=0.7, granularity=granularity, rounds=3, recovery_steps=4,
                         batch_size=2, seq_len=32, lr=1e-2)
    out, report = prune(params, recipe, calib, cfg=cfg)
    names = scope_names(params, ("blocks",))
    sizes = [get(params, n).numel() for n in names]
    for r, record in zip(range(1, 4), report.rounds):
        target = cubic_sparsity(r, 3, 0.7)
        assert record["sparsity_target"] == target
        want = (sum(count_for(target, s) for s in sizes) if granularity == "layer"
                else count_for(target, sum(sizes)))
        assert record["sparsity"] * sum(sizes) == pytest.approx(want, abs=1e-6)
        assert record["recovery_loss_first"] > 0
    for n in names:
        zeros = int((get(out, n) == 0).sum())
        if granularity == "layer":
            assert zeros == count_for(0.7, get(params, n).numel()), n
    assert report.scope["zeros"] == (sum(count_for(0.7, s) for s in sizes) if granularity == "layer"
                                     else count_for(0.7, sum(sizes)))
    # recovery trained the kept weights (the masks held, the rest moved)
    w0, w1 = get(params, names[0]), get(out, names[0])
    kept = w1 != 0
    assert not torch.equal(w0[kept], w1[kept])


def test_iterative_structured_reaches_target_widths():
    params, cfg = random_model("tiny-openpangu", num_layers=3)
    calib = torch.randint(0, cfg.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    recipe = PruneRecipe("iterative", base="structured", heads=0.5, ffn=0.6, rounds=2, recovery_steps=3,
                         recovery_loss="distill", batch_size=2, seq_len=32)
    out, report = prune(params, recipe, calib, cfg=cfg)
    for blk in out["blocks"]:
        s = layer_sizes(blk, cfg)
        assert (s.num_heads, s.num_kv_heads, s.intermediate_size) == (2, 1, 128 - count_for(0.6, 128))
    r1 = report.rounds[0]
    assert r1["heads_target"] == cubic_sparsity(1, 2, 0.5)
    assert r1["neurons_removed"] == 3 * count_for(cubic_sparsity(1, 2, 0.6), 128)
    assert report.rounds[-1]["neurons_removed"] == 3 * count_for(0.6, 128)
    pf.validate(out, cfg)


def test_distillation_loss_is_zero_against_itself():
    params, cfg = random_model("tiny-gpt")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    loss = distill_loss(params, cfg)
    assert loss(params, tokens).item() == pytest.approx(0.0, abs=1e-6)
    pruned, _ = prune(params, PruneRecipe("magnitude", 0.5))
    assert loss(pruned, tokens).item() > 1e-3


def test_iterative_needs_calibration_for_recovery():
    params, cfg = random_model("tiny-gpt")
    with pytest.raises(ConfigError, match="calibration"):
        prune(params, PruneRecipe("iterative", 0.5), cfg=cfg)
    _out, report = prune(params, PruneRecipe("iterative", 0.5, recovery_steps=0, rounds=2), cfg=cfg)
    assert report.scope["sparsity"] == 0.5


@pytest.fixture
def one_thread():
    """Matrices of 256 columns gain nothing from a second thread, and lose a lot when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.heavy
def test_demo_model_recovery_lowers_perplexity(one_thread):
    """70% magnitude sparsity in two rounds of the schedule on the trained demo model, with and
    without 20 steps of distillation recovery per round on training text (the pydoc topics of
    the demo corpus's training split); perplexity on held-out documents."""
    from pangu_fn import data
    from pangu_fn.tokenizer import load_tokenizer

    params, cfg = pf.load(DEMO / "target", dtype="fp32")
    tok = load_tokenizer(DEMO / "target")
    eval_ids = data.token_stream(tok, data.read_documents(DEMO / "heldout.jsonl"))[:2500].tolist()
    train_docs, _ = data.split(data.pydoc_documents(), 0.05)
    calib = data.token_stream(tok, train_docs)
    base = PruneRecipe("iterative", sparsity=0.7, rounds=2, batch_size=4, seq_len=64, lr=5e-4)
    _, rep0 = prune(params, base.replace(recovery_steps=0), calib, cfg=cfg, eval_ids=eval_ids)
    _, rep1 = prune(params, base.replace(recovery_steps=20), calib, cfg=cfg, eval_ids=eval_ids)
    for rep in (rep0, rep1):
        assert rep.scope["zeros"] == sum(count_for(0.7, t["numel"]) for t in rep.tensors)
    assert rep0.perplexity["after"] > rep0.perplexity["before"]
    assert rep1.perplexity["after"] < rep0.perplexity["after"]
