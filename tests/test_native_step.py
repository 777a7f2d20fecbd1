"""The fused decode step (`native_step`) against the PyTorch blocks it replaces.

Every check runs the same forward call twice, once through the native step and once with
`native_step.disabled()`, on copies of one cache: logits and the cache entries written must
agree (fp32: to summation order; bf16 and quantized trees: to bf16 rounding, since the step
computes in fp32 where PyTorch rounds activations to bf16), and greedy tokens must be equal.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

import pangu_fn as pf
from pangu_fn import native, native_step
from pangu_fn.errors import InputError
from pangu_fn.model import forward
from pangu_fn.params import decode_layout, fuse_projections, map_with_names

pytestmark = pytest.mark.skipif(native.step_library() is None, reason="needs x86-64 with AVX2 and FMA")

FAMILIES = ("tiny-gpt", "tiny-alpha", "tiny-openpangu")


def wide(name: str) -> pf.ModelConfig:
    """The tiny preset at hidden size 128 (int4 kernels need K % 128 == 0)."""
    return dataclasses.replace(pf.PRESETS[name], hidden_size=128, head_dim=32, intermediate_size=256)


def random_tree(cfg: pf.ModelConfig, seed: int = 1) -> dict:
    """Random weights with biases and norm weights redrawn (init_params makes them 0 and 1)."""
    gen = torch.Generator().manual_seed(seed)

    def redraw(name: str, t: object) -> object:
        if isinstance(t, torch.Tensor) and (name.endswith("bias") or "norm" in name):
            return t + 0.1 * torch.randn(t.shape, generator=gen)
        return t

    return map_with_names(redraw, pf.init_params(cfg, seed=seed))


def column_major(params: dict) -> dict:
    """The blocks' matrices stored transposed (strides (1, out)), as `decode_layout` keeps them
    where the native fp32 kernel does not run."""
    return map_with_names(lambda n, t: t.t().contiguous().t() if t.dim() == 2 and n.startswith("blocks.") else t,
                          params)


def tree(cfg: pf.ModelConfig, kind: str) -> dict:
    params = random_tree(cfg)
    if kind == "column-major":  # fp32 weights stored transposed (decode_layout's without the fp32 kernel)
        return column_major(params)
    if kind == "bf16":
        return pf.astype(params, torch.bfloat16)
    if kind in ("int8", "int4"):
        return pf.quantize(params, pf.QuantRecipe(scheme=kind, group_size=32, head="keep"), cfg)
    if kind == "fused":
        return fuse_projections(params, cfg)
    if kind == "pruned":  # a different head count and MLP width per block
        recipe = pf.PruneRecipe(method="structured", remove_heads={0: (0,)}, remove_neurons={1: tuple(range(64))})
        return column_major(pf.prune(params, recipe, cfg=cfg)[0])  # widths of 48: K % 32 != 0 row-major
    return params


def both_ways(params: dict, cfg: pf.ModelConfig, lengths: list[int], t: int, seed: int = 0):
    """(logits, cache) of one step of `t` tokens after prompts of `lengths`, fused and not."""
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    prompts = torch.randint(0, cfg.vocab_size, (B, max(lengths)), generator=gen)
    step = torch.randint(0, cfg.vocab_size, (B, t), generator=gen)
    with torch.inference_mode(), native_step.disabled():
        cache = pf.init_cache(params, cfg, B, 40)
        _, cache = forward(params, cfg, prompts, cache)
        cache = cache.with_lengths(lengths)
    out = []
    for fused in (True, False):
        c = cache.clone()
        with torch.inference_mode():
            if fused:
                assert native_step.plan(params, cfg) is not None
                logits, c = forward(params, cfg, step, c)
            else:
                with native_step.disabled():
                    logits, c = forward(params, cfg, step, c)
        out.append((logits.float(), c))
    return out


def assert_close(fused, plain, cfg, atol):
    (a, ca), (b, cb) = fused, plain
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
    for ka, kb, va, vb in zip(ca.keys, cb.keys, ca.values, cb.values):
        torch.testing.assert_close(ka.float(), kb.float(), atol=atol, rtol=0)
        torch.testing.assert_close(va.float(), vb.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", ["fp32", "column-major", "fused", "pruned"])
def test_fp32_trees_match_the_pytorch_blocks(name, kind):
    cfg = pf.PRESETS[name]
    params = tree(cfg, kind)
    for lengths, t in (([7], 1), ([7, 3, 5], 1), ([6, 2], 4)):  # decode, ragged decode, verification
        assert_close(*both_ways(params, cfg, lengths, t), cfg, atol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_bf16_and_quantized_trees_match_to_bf16_rounding(name, kind):
    cfg = wide(name)
    params = tree(cfg, kind)
    for lengths, t in (([7], 1), ([7, 3, 5], 1), ([6, 2], 4)):
        fused, plain = both_ways(params, cfg, lengths, t)
        scale = plain[0].abs().max().item()
        assert_close(fused, plain, cfg, atol=0.03 * max(scale, 1.0))


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_with_and_without_the_step(name):
    cfg = pf.PRESETS[name]
    params = decode_layout(random_tree(cfg, seed=3))
    prompts = [[5, 9, 1, 7, 3], [2, 8], [4, 4, 6, 1]]
    fused = pf.generate(params, cfg, prompts, 12, eos_token_ids=())
    with native_step.disabled():
        plain = pf.generate(params, cfg, prompts, 12, eos_token_ids=())
    assert [c.tokens for c in fused] == [c.tokens for c in plain]


def test_speculative_decoding_with_the_step_is_lossless():
    cfg = pf.PRESETS["tiny-openpangu"]
    params = random_tree(cfg, seed=4)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    plain = pf.generate(params, cfg, prompts, 10, eos_token_ids=())
    spec = pf.speculative_generate(params, cfg, prompts, 10, eos_token_ids=(), drafter=pf.SelfDraft(layers=1), k=3)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]


def test_steps_it_does_not_take_fall_back_to_the_blocks():
    cfg = pf.PRESETS["tiny-gpt"]
    params = random_tree(cfg)
    x = torch.zeros(1, native_step.MAX_ROWS + 1, cfg.hidden_size)
    with torch.inference_mode():
        cache = pf.init_cache(params, cfg, 1, 40)
        positions = torch.arange(native_step.MAX_ROWS + 1)[None]
        assert native_step.fused_blocks(params, cfg, x, positions, cache) is None  # too many rows
        assert native_step.fused_blocks(params, cfg, x[:, :2], positions[:, :2], cache) is not None
        assert native_step.fused_blocks(params, cfg, x[:, :1], torch.tensor([[40]]), cache) is None  # past the cache
        small = pf.init_cache(params, cfg, 1, 40, dtype=torch.bfloat16)  # another dtype than the tree's
        assert native_step.fused_blocks(params, cfg, x[:, :1], positions[:, :1], small) is None
    odd = dataclasses.replace(cfg, hidden_size=48, head_dim=12, intermediate_size=96)  # bf16 needs K % 32 == 0
    assert native_step.plan(pf.astype(random_tree(odd), torch.bfloat16), odd) is None
    with torch.inference_mode(), pytest.raises(InputError, match="cache holds"):
        cache = pf.init_cache(params, cfg, 1, 4)
        forward(params, cfg, torch.ones(1, 5, dtype=torch.int64), cache)


def test_threads_share_a_tree():
    cfg = pf.PRESETS["tiny-openpangu"]
    params = random_tree(cfg, seed=5)
    prompts = [[[1 + i, 2, 3 + i]] for i in range(4)]
    want = [pf.generate(params, cfg, p, 8, eos_token_ids=())[0].tokens for p in prompts]
    got: list[list[int] | None] = [None] * 4

    def run(i: int) -> None:
        got[i] = pf.generate(params, cfg, prompts[i], 8, eos_token_ids=())[0].tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == want


def test_plans_hold_no_tree_and_never_serve_another():
    """A plan holds its tree's leaves weakly: once another tree was planned (or `clear_plans`),
    a dropped tree is freed; a plan is never used for a tree whose leaves differ."""
    import gc
    import weakref

    cfg = pf.PRESETS["tiny-gpt"]
    a = random_tree(cfg, seed=6)
    plan_a = native_step.plan(a, cfg)
    assert plan_a is not None and plan_a.fits(a)
    b = {**a, "blocks": [*a["blocks"][:-1], map_with_names(lambda n, t: t.clone(), a["blocks"][-1])]}
    assert not plan_a.fits(b)  # same shapes, one block's tensors replaced
    plan_b = native_step.plan(b, cfg)
    assert plan_b is not plan_a and plan_b.fits(b)
    leaf = weakref.ref(a["blocks"][-1]["attn"]["q"]["weight"])
    del a, plan_a
    native_step.plan(random_tree(cfg, seed=7), cfg)  # another tree is the last planned now
    gc.collect()
    assert leaf() is None
