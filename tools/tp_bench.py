"""`pangu bench --tp N`: decode speed and peak memory of N ranks against one process, same run.

The N ranks run first (`threads // N` CPU threads each; a checkpoint folder of ours is read
slice by slice, a preset's random weights are drawn for the rank's part only), and rank 0
writes its row and every rank's peak RSS to a file; then this process measures the same
model unsharded with `threads` threads. The JSON holds both rows, the decode ratio and the
ratio of each rank's peak RSS to the single process's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import tensor_parallel

OUT_ENV = "PANGU_TP_BENCH_OUT"


def prompt_for(cfg: Any, length: int) -> list[int]:
    """bench's prompt: `length` ids drawn with seed 1234."""
    import torch

    return torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(1234)).tolist()


def run(args: argparse.Namespace, measure: Any, engine: Any) -> int:
    """In a rank: measure and report. In the launching process: start the ranks, then measure
    one process and write the JSON (`--json`). Returns the exit code."""
    if tensor_parallel.is_rank():
        return _rank(args, measure, engine)
    import platform

    import torch

    import pangu_fn as pf

    from .common import resolve_model, write_json

    per_rank = max(1, args.threads // args.tp)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        code = tensor_parallel.start(args, threads=per_rank, env={OUT_ENV: str(out)})
        if code:
            return code
        ranks = json.loads(out.read_text())
    torch.set_num_threads(args.threads)
    params, cfg, _ = resolve_model(args.model, args.device, args.dtype, args.weights_seed)
    print(f"bench: pangu-fn tp=1 ({args.threads} threads) ...", file=sys.stderr, flush=True)
    single = {"engine": "pangu-fn tp=1", "threads": args.threads,
              **measure(engine(params, cfg), prompt_for(cfg, args.prompt_len), args.new_tokens, args.repeats,
                        args.warmup)}
    peak = pf.memory_stats("cpu")["peak_rss"]
    sharded = {"engine": f"pangu-fn tp={args.tp}", "threads": per_rank, **ranks["row"]}
    tp = {"world_size": args.tp, "threads_per_rank": per_rank, "single_peak_rss_mb": round(peak / 2**20, 1),
          "rank_peak_rss_mb": [round(b / 2**20, 1) for b in ranks["peak_rss"]],
          "rank_peak_rss_vs_single": [round(b / peak, 3) for b in ranks["peak_rss"]],
          "rank_param_mb": [round(b / 2**20, 1) for b in ranks["param_bytes"]],
          "decode_tp_vs_single": round(sharded["decode_tok_s"] / single["decode_tok_s"], 3)}
    result = {"command": "pangu " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("pangu") else None,
              "model": args.model, "parameters": pf.count_params(params), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
              "device": pf.device_info(args.device)["name"], "torch": torch.__version__,
              "python": platform.python_version(), "results": [single, sharded], "tensor_parallel": tp}
    for row in result["results"]:
        print(f"{row['engine']:>14} ({row['threads']} threads)  prefill {row['prefill_ms']:8.2f} ms   "
              f"decode {row['decode_tok_s']:8.2f} tok/s", file=sys.stderr)
    print(f"tp={args.tp}: decode x{tp['decode_tp_vs_single']} vs one process; peak RSS per rank "
          f"{tp['rank_peak_rss_vs_single']} of the single process's; rank 0 spent "
          f"{sharded['collective_share']:.0%} of its time in {sharded['collectives_per_call']} collectives a "
          f"step (one all-reduce: {sharded['all_reduce_us']} us)", file=sys.stderr)
    if args.json_out:
        write_json(result, args.json_out)
    return 0


def _rank(args: argparse.Namespace, measure: Any, engine: Any) -> int:
    import torch.distributed as dist

    import pangu_fn as pf
    from pangu_fn.distributed.timing import all_reduce_latency

    if Path(args.model).exists():
        params, cfg, _ = tensor_parallel.rank_model(args)
    else:
        params, cfg = _random_part(args)
    row = {**measure_split(args, measure, engine(params, cfg), prompt_for(cfg, args.prompt_len)),
           "all_reduce_us": round(all_reduce_latency(cfg.hidden_size, pf.cache.compute_dtype(params)) * 1e6, 1)}
    mine = [pf.memory_stats("cpu")["peak_rss"], pf.nbytes(params)]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        Path(os.environ[OUT_ENV]).write_text(json.dumps({"row": row, "peak_rss": [e[0] for e in every],
                                                         "param_bytes": [e[1] for e in every]}))
    return 0


def measure_split(args: argparse.Namespace, measure: Any, run: Any, prompt: list[int]) -> dict[str, Any]:
    """`measure`'s row with where the time went: collectives per forward call (a prefill or a
    decode step), their wall time per call (waiting for the peers included) and their share of
    the measured time (warmup runs included in both)."""
    import time

    from pangu_fn.distributed.timing import collective_time

    start = time.perf_counter()
    with collective_time() as spent:
        row = measure(run, prompt, args.new_tokens, args.repeats, args.warmup)
    calls = (args.repeats + args.warmup) * args.new_tokens
    return {**row, "collectives_per_call": round(spent.count / calls, 1),
            "collective_ms_per_call": round(spent.seconds * 1e3 / calls, 3),
            "collective_share": round(spent.seconds / (time.perf_counter() - start), 3)}


def _random_part(args: argparse.Namespace) -> tuple[Any, Any]:
    """A preset's rank part with random values drawn for that part only (a rank never holds
    the whole model; speed does not depend on the values)."""
    import torch

    import pangu_fn as pf
    from pangu_fn.distributed import init
    from pangu_fn.distributed.group import local_device
    from pangu_fn.distributed.plan import REPLICATE, split_plan
    from pangu_fn.distributed.shard import wrap
    from pangu_fn.distributed.slicing import cut_shape
    from pangu_fn.params import decode_layout, parse_dtype
    from pangu_fn.tree import flatten, unflatten

    device = local_device(pf.select_device(args.device))
    rank, world = init(device)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the rank)
    cfg = pf.ModelConfig.preset(args.model)
    dtype = parse_dtype(args.dtype or "fp32")
    meta = flatten(pf.init_params(cfg, device="meta"))
    plan = split_plan({n: tuple(t.shape) for n, t in meta.items()}, cfg, rank, world)
    gen = torch.Generator().manual_seed(args.weights_seed + rank)

    def draw(name: str, t: torch.Tensor) -> torch.Tensor:
        shape = cut_shape(tuple(t.shape), plan.get(name, REPLICATE))
        if len(shape) == 2:
            return (torch.randn(shape, generator=gen) * 0.02).to(dtype=dtype, device=device)
        return (torch.ones if "norm" in name and name.endswith("weight") else torch.zeros)(shape, dtype=dtype,
                                                                                         device=device)

    local = decode_layout(unflatten({n: draw(n, t) for n, t in meta.items()}))
    return wrap(local, plan, cfg), cfg
