"""`pangu bench --scheme ...`: the same weights quantized in the same run, one row per scheme
(built, measured and freed in turn), with each quantized model's peak RSS measured in a
fresh process (`python -m pangu_tools.quant_bench FOLDER ...`, Linux `/proc` counters).

Rows are timed one model at a time (a warm-up, then every repeat), as a user decodes. With
`--in-turns` each row is then timed again taking turns with the unquantized model (the first
row's), who goes first rotating, and records `in_turns` with the ratio of those interleaved
medians: immune to the machine's slow drift between rows, but on this CPU alternating models
also slows the quantized kernels (see docs/benchmarks.md), so it is reported beside the
one-at-a-time figure, not instead of it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_SCHEMES = ("bf16", "fp16", "int8", "int4")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", action="append", default=[], metavar="LIST",
                   help="also run the weights quantized, one row each: comma list of bf16, fp16, int8, int4")
    p.add_argument("--group-size", type=int, default=128, help="int4 group along K (default 128)")
    p.add_argument("--asym", action="store_true", help="int4 with zero points")
    p.add_argument("--quant-head", default="keep", choices=["keep", "int8", "int4"],
                   help="int8 / int4 rows: LM head kept in bf16 (default) or quantized")
    p.add_argument("--no-rss", action="store_true", help="skip the per-scheme peak-RSS child process")
    p.add_argument("--in-turns", action="store_true",
                   help="also time each --scheme row in turns with the unquantized model (field in_turns)")


def schemes(values: list[str]) -> list[str]:
    """`--scheme` values (repeatable, comma lists) in order. Raises ConfigError."""
    from pangu_fn.errors import ConfigError

    out = [s.strip() for v in values for s in v.split(",") if s.strip()]
    bad = [s for s in out if s not in BENCH_SCHEMES]
    if bad:
        raise ConfigError(f"--scheme {bad[0]!r}: expected a comma list of {list(BENCH_SCHEMES)}")
    return out


def recipe(scheme: str, args: argparse.Namespace) -> Any:
    from pangu_fn.quant import QuantRecipe

    if scheme in ("bf16", "fp16"):
        return QuantRecipe(scheme)
    return QuantRecipe(scheme, group_size=args.group_size, symmetric=not args.asym, head=args.quant_head)


def scheme_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int],
                measure: Callable[..., dict[str, Any]], engine: Callable[[Any, Any], Any]) -> list[dict[str, Any]]:
    """One result row per `--scheme`: decode / prefill speed (and with --in-turns the ratio in
    turns with the unquantized model, see the module docstring), stored and resident weight
    bytes and (unless --no-rss) the peak RSS of a process that loads and runs the quantized model."""
    import gc

    import pangu_fn as pf
    from pangu_fn.quant import quantize
    from pangu_fn.quant.report import resident_nbytes

    from .bench import measure_interleaved

    rows = []
    for scheme in schemes(args.scheme):
        r = recipe(scheme, args)
        print(f"bench: quantizing to {r.summary()} ...", file=sys.stderr, flush=True)
        tree = quantize(params, r)
        resident = resident_nbytes(tree)
        row = {"engine": f"pangu-fn {scheme}", "dtype": str(pf.cache.compute_dtype(tree)).replace("torch.", ""),
               "recipe": r.describe(),
               "weight_mb": round(pf.nbytes(tree) / 2**20, 2), "resident_mb": round(resident / 2**20, 2)}
        print(f"bench: pangu-fn {scheme} ({row['dtype']}) ...", file=sys.stderr, flush=True)
        quantized = engine(tree, cfg)
        row.update(measure(quantized, prompt, args.new_tokens, args.repeats, args.warmup))
        if args.in_turns:
            base, this = measure_interleaved([engine(params, cfg), quantized], prompt, args.new_tokens, args.repeats,
                                             args.warmup, rotate=True)
            row["in_turns"] = {"base_decode_tok_s": base["decode_tok_s"], "decode_tok_s": this["decode_tok_s"],
                               "decode_vs_base": round(this["decode_tok_s"] / base["decode_tok_s"], 3)}
        if not args.no_rss:
            row["rss"] = rss_probe(tree, cfg, prompt, args.new_tokens, args.threads)
        rows.append(row)
        del tree
        gc.collect()
    return rows


# glibc raises its mmap threshold after large frees, after which freed buffers stay in the heap
# and RSS reflects the allocator's history more than live memory (the same int4 run measured
# 104 or 171 MiB depending on what ran before it); the probe pins the threshold at its default.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def rss_probe(params: Any, cfg: Any, prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """Save the tree, then load and decode it in a fresh process; returns its RSS figures (MiB)."""
    import os

    import pangu_fn as pf

    with tempfile.TemporaryDirectory() as tmp:
        pf.save(Path(tmp) / "model", params, cfg)
        done = subprocess.run([sys.executable, "-m", "pangu_tools.quant_bench", str(Path(tmp) / "model"),
                               json.dumps(prompt), str(new_tokens), str(threads)],
                              capture_output=True, text=True, check=False, env={**os.environ, **PROBE_ENV})
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "env": PROBE_ENV}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(path: str, prompt: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    """In the fresh process: RSS before loading (after a tiny model has run, so that torch's
    thread pools are already in it), then the peaks while loading, during a first generation
    (int4 packing, kernel set-up) and during a second one (steady state), each after
    resetting the high-water mark through /proc/self/clear_refs; in MiB above the baseline."""
    import torch

    import pangu_fn as pf
    from pangu_fn.quant.report import resident_nbytes

    torch.set_num_threads(threads)
    warm = pf.init_params(pf.ModelConfig.preset("tiny-gpt"))  # start torch's thread pools and kernels first
    for tree in (warm, pf.quantize(warm, pf.QuantRecipe("int4", group_size=32))):
        pf.generate(tree, pf.ModelConfig.preset("tiny-gpt"), [[1, 2, 3]], 2)
    del warm, tree
    base = _status_kb("VmRSS")
    params, cfg = pf.load(path)
    load_peak = _status_kb("VmHWM")
    peaks = []
    for _ in range(2):  # the first run also packs int4 weights and builds oneDNN's kernels
        Path("/proc/self/clear_refs").write_text("5")
        for _ in pf.stream(params, cfg, [prompt], new_tokens, eos_token_ids=()):
            pass
        peaks.append(_status_kb("VmHWM"))
    first_peak, run_peak = peaks
    weights = pf.nbytes(params)
    resident = resident_nbytes(params)
    length = len(prompt) + new_tokens
    # fp32 bytes of what one run holds besides weights: the KV cache, prefill logits, the widest MLP activation
    activations = 4 * (2 * cfg.num_blocks * cfg.num_kv_heads * cfg.head_dim * length
                       + len(prompt) * (cfg.vocab_size + 2 * cfg.intermediate_size))
    mb = 1 / 1024
    return {"baseline_mb": round(base * mb, 1), "load_peak_mb": round((load_peak - base) * mb, 1),
            "first_run_peak_mb": round((first_peak - base) * mb, 1), "run_peak_mb": round((run_peak - base) * mb, 1), "weights_mb": round(weights / 2**20, 1),
            "resident_weights_mb": round(resident / 2**20, 1), "fp32_activations_mb": round(activations / 2**20, 1),
            "run_peak_vs_weights": round((run_peak - base) * 1024 / weights, 3),
            "within_1.2x_weights_plus_activations": (run_peak - base) * 1024 <= 1.2 * weights + activations}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))))
