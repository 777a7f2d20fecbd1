"""Converting a MindSpore checkpoint of a few hundred MB keeps the converting process's peak
RSS within the largest tensor plus a small constant above its RSS before the conversion."""

from __future__ import annotations

import binascii
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peak_rss_script
from mindspore_bytes import tensor_value

HIDDEN, VOCAB, SEQ, LAYERS = 1024, 16384, 1024, 5  # 1024 hidden: the 350M shape, 16 heads known
MIB = 2**20
# write chunks (4 MiB) and allocator slack: glibc's dynamic mmap threshold keeps up to 32 MiB of
# freed tensors in the heap; reading the whole model instead would add ~360 MiB
SLACK = 64 * MIB


def build_checkpoint(path) -> tuple[int, int]:
    """A PanGu-α MindSpore .ckpt (with CRC trailer) written tensor by tensor;
    returns (file size, largest tensor bytes)."""
    fill = torch.linspace(-1, 1, 4 * HIDDEN * HIDDEN)

    def t(*shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        return fill[:n].reshape(shape) if n <= fill.numel() else torch.linspace(-1, 1, n).reshape(shape)

    def block(prefix: str):
        h, f = HIDDEN, 4 * HIDDEN
        yield from [(prefix + "layernorm1.gamma", t(h)), (prefix + "layernorm1.beta", t(h))]
        for d in ("dense1", "dense2", "dense3"):
            yield from [(f"{prefix}attention.{d}.weight", t(h, h)), (f"{prefix}attention.{d}.bias", t(h))]
        yield from [(prefix + "attention.projection.weight", t(h, h)), (prefix + "attention.projection.bias", t(h)),
                    (prefix + "layernorm2.gamma", t(h)), (prefix + "layernorm2.beta", t(h)),
                    (prefix + "output.mapping.weight", t(h, f)), (prefix + "output.mapping.bias", t(f)),
                    (prefix + "output.projection.weight", t(f, h)), (prefix + "output.projection.bias", t(h))]

    def entries():
        yield "backbone.word_embedding.embedding_table", torch.linspace(-1, 1, VOCAB * HIDDEN).reshape(VOCAB, HIDDEN)
        yield "backbone.position_embedding.embedding_table", t(SEQ, HIDDEN)
        yield "backbone.top_query_embedding.embedding_table", t(SEQ, HIDDEN)
        for i in range(LAYERS):
            yield from block(f"backbone.blocks.{i}.")
        yield from block("backbone.top_query_layer.")
        yield "backbone.layernorm.gamma", t(HIDDEN)
        yield "backbone.layernorm.beta", t(HIDDEN)

    crc, size, largest = 0, 0, 0
    with open(path, "wb") as f:
        for name, tensor in entries():
            data = tensor_value(name, tensor)
            crc = binascii.crc32(data, crc)
            f.write(data)
            size += len(data)
            largest = max(largest, tensor.numel() * 4)
        f.write(b"crc_num" + crc.to_bytes(10, "big"))
    return size + 17, largest


SCRIPT = peak_rss_script(
    "import pangu_fn, pangu_fn.io.writers, pangu_fn.io.alpha, tqdm\nfrom pangu_tools.cli import main\n"
    "from pangu_tools import convert",
    'result = {"code": main(["convert", sys.argv[1], sys.argv[2]])}')


@pytest.mark.heavy
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS counters")
def test_peak_memory_is_one_tensor(tmp_path):
    size, largest = build_checkpoint(tmp_path / "big.ckpt")
    assert size > 300 * MIB
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "big.ckpt"), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["code"] == 0
    grown = r["peak"] - r["base"]
    print(f"checkpoint {size / MIB:.0f} MiB, largest tensor {largest / MIB:.0f} MiB, "
          f"RSS {r['base'] / MIB:.0f} -> peak {r['peak'] / MIB:.0f} MiB (+{grown / MIB:.0f} MiB)")
    assert grown <= largest + SLACK
    written = sum(f.stat().st_size for f in (tmp_path / "out").iterdir())
    assert written > size - MIB  # everything was written (nothing skipped)
