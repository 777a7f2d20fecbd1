"""Loading an fp32 model onto the CPU holds its weights once: each matrix is laid out for
decoding (column-major) as it is read, slab by slab, so the loading process's peak RSS grows by
the stored weight bytes plus a small constant, not by two copies of the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peak_rss_script

import pangu_fn as pf
from pangu_fn.tree import flatten

MIB = 2**20
SLACK = 40 * MIB  # slabs (4 MiB), small tensors, allocator slack

SCRIPT = peak_rss_script("import pangu_fn as pf", """
params, cfg = pf.load(sys.argv[1])
w = params["blocks"][0]["mlp"]["up"]["weight"]
from pangu_fn.params import column_major_fp32
head = params["tok_embed"]["weight"]
result = {"column_major": w.t().is_contiguous(), "head_column_major": head.t().is_contiguous(),
          "row_major": w.is_contiguous() and head.is_contiguous(), "want_column_major": column_major_fp32()}
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS counters")
def test_fp32_load_holds_the_weights_once(tmp_path):
    cfg = pf.ModelConfig.preset("tiny-gpt").replace(hidden_size=512, num_heads=8, num_layers=4, vocab_size=32768,
                                                    max_seq_len=256)
    params = pf.init_params(cfg, seed=0)
    pf.save(tmp_path / "m", params, cfg)
    stored = sum(f.stat().st_size for f in (tmp_path / "m").glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    print(f"stored {stored / MIB:.0f} MiB, RSS {r['base'] / MIB:.0f} -> peak {r['peak'] / MIB:.0f} MiB "
          f"(+{grown / MIB:.0f} MiB)")
    if r["want_column_major"]:  # decode_layout's layout: column-major without the native fp32 kernel
        assert r["column_major"] and r["head_column_major"]
    else:
        assert r["row_major"]
    assert grown <= 1.05 * stored + SLACK  # reading everything, then laying it out, took ~1.3x + the head
    loaded, _ = pf.load(tmp_path / "m")
    want = flatten(params)
    assert all(torch.equal(t, want[name]) for name, t in flatten(loaded).items()) and flatten(loaded).keys() == want.keys()
