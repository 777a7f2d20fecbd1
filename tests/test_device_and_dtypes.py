"""Device selection, device facts, and the three compute dtypes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import FAMILIES, random_model

import pangu_fn as pf


def test_select_device_order_and_errors():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pf.select_device().type in ("npu", expected)
    assert pf.select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(pf.ConfigError, match="device 'cuda' is not available here"):
            pf.select_device("cuda")
    with pytest.raises(pf.ConfigError, match="unknown device"):
        pf.select_device("toaster")


def test_device_info_and_memory_stats_on_cpu():
    info = pf.device_info("cpu")
    assert info["type"] == "cpu" and info["total_memory"] > info["free_memory"] > 0 and info["threads"] >= 1
    mem = pf.memory_stats("cpu")
    assert 0 < mem["rss"] <= mem["peak_rss"]
    pf.synchronize("cpu")
    pf.empty_cache("cpu")


def test_absent_torch_npu_costs_nothing_and_prints_nothing():
    code = ("import sys, pangu_fn as pf; d = pf.select_device(); "
            "assert 'torch_npu' not in sys.modules or d.type == 'npu'; print(d.type)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() in ("cpu", "cuda", "npu") and proc.stderr == ""


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_tracks_fp32(preset, dtype):
    params, cfg = random_model(preset, seed=3)
    half = pf.astype(params, dtype)
    assert pf.nbytes(half) * 2 == pf.nbytes(params)
    toks = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, _ = pf.forward(params, cfg, toks)
    got, _ = pf.forward(half, cfg, toks)
    assert got.dtype == dtype
    corr = torch.corrcoef(torch.stack([ref.flatten(), got.float().flatten()]))[0, 1]
    assert corr > 0.99
    cache = pf.init_cache(half, cfg, 2, 16)
    assert cache.keys[0].dtype == dtype
    out = pf.generate(half, cfg, [[1, 2, 3], [4]], 6, eos_token_ids=())
    assert all(len(c.tokens) == 6 for c in out)


def test_astype_leaves_the_input_untouched():
    params, _ = random_model("tiny-gpt")
    before = params["blocks"][0]["attn"]["q"]["weight"].clone()
    pf.astype(params, "bf16")
    assert params["blocks"][0]["attn"]["q"]["weight"].dtype == torch.float32
    assert torch.equal(params["blocks"][0]["attn"]["q"]["weight"], before)


def test_meta_init_makes_shapes_only():
    cfg = pf.ModelConfig.preset("openpangu-embedded-7b")
    params = pf.init_params(cfg, device="meta")
    pf.validate(params, cfg)
    assert params["lm_head"]["weight"].is_meta
    assert 7.0e9 < pf.count_params(params) < 8.5e9
