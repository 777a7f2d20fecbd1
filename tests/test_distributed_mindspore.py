"""A tensor-parallel rank reading a MindSpore `.ckpt` reads only its slices: its tree equals
`shard(load(...))` of the whole checkpoint, and the reader copies exactly the bytes of the
rank's parts (computed here from the sharding plan), no more. No process group is needed:
`load_shard` only builds the leaves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peak_rss_script, random_model

import pangu_fn as pf
from pangu_fn.distributed import load_shard, shard, split_plan
from pangu_fn.distributed.leaves import _Parallel
from pangu_fn.distributed.plan import REPLICATE
from pangu_fn.io import mindspore
from pangu_fn.io.checkpoint import source_of
from pangu_fn.io.writers import write_mindspore
from pangu_fn.tree import flatten, nbytes

MIB = 2**20
# a PanGu-α shape whose weights (~180 MB of fp32) dwarf the reader's buffers and allocator slack
BIG = {"hidden_size": 512, "num_heads": 8, "head_dim": 64, "intermediate_size": 2048, "num_layers": 3,
       "vocab_size": 64000, "max_seq_len": 256}
LOAD_RANK_0 = peak_rss_script("import pangu_fn as pf\nfrom pangu_fn.distributed import load_shard", """
cfg = pf.ModelConfig.preset("tiny-alpha").replace(**json.loads(sys.argv[2]))
params, _ = load_shard(sys.argv[1], 0, 2, config=cfg)
result = {"held": pf.tree.nbytes(params)}
""")


def _local(leaf):
    return leaf.local if isinstance(leaf, _Parallel) else leaf


def test_a_rank_reads_only_its_slices_of_a_mindspore_ckpt(tmp_path, monkeypatch):
    params, cfg = random_model("tiny-alpha", seed=13)
    path = write_mindspore(source_of(params, cfg), tmp_path / "alpha.ckpt")
    whole, cfg = pf.load(path, config=cfg)
    readers = []
    opened = mindspore.CheckpointReader.__init__

    def keep(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(mindspore.CheckpointReader, "__init__", keep)
    shapes = {n: tuple(t.shape) for n, t in flatten(whole).items()}
    total = sum(t.numel() * t.element_size() for t in flatten(whole).values())
    for rank in range(2):
        readers.clear()
        part, _ = load_shard(path, rank, 2, config=cfg)
        expected = flatten(shard(whole, cfg, rank, 2))
        got = flatten(part)
        assert got.keys() == expected.keys()
        for name in got:
            assert torch.equal(_local(got[name]), _local(expected[name])), name
        plan = split_plan(shapes, cfg, rank, 2)
        share = 0  # bytes of the rank's slices: its ranges of each split tensor, the replicated rest whole
        for name, shape in shapes.items():
            split, n = plan.get(name, REPLICATE), math.prod(shape)
            picked = sum(b - a for a, b in split.ranges)
            if split.how in ("column", "vocab"):  # rows
                n = picked * math.prod(shape[1:])
            elif split.how == "row" and len(shape) == 2:  # columns
                n = shape[0] * picked
            share += n * 4  # fp32
        assert sum(r.bytes_read for r in readers) == share
        assert share < 0.75 * total


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS counters")
def test_a_rank_loading_a_mindspore_ckpt_never_holds_the_whole_checkpoint(tmp_path):
    cfg = pf.ModelConfig.preset("tiny-alpha").replace(**BIG)
    params = pf.init_params(cfg, seed=0)
    path = write_mindspore(source_of(params, cfg), tmp_path / "big.ckpt")
    total = nbytes(params)
    assert path.stat().st_size >= total
    del params
    out = subprocess.run([sys.executable, "-c", LOAD_RANK_0, str(path), json.dumps(BIG)], capture_output=True,
                         text=True, timeout=120, check=False)  # a fresh process: its own peak, not pytest's
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grown = r["peak"] - r["base"]
    print(f"checkpoint {total / MIB:.0f} MiB, rank 0 holds {r['held'] / MIB:.0f} MiB, "
          f"its peak RSS grew {grown / MIB:.0f} MiB")
    assert r["held"] < 0.55 * total  # half of every split tensor, the small replicated rest whole
    assert grown >= 0.9 * r["held"]  # the measurement sees the rank's own share...
    assert grown < 0.75 * total, (grown, total)  # ...and never the whole checkpoint
