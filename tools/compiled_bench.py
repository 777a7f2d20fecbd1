"""Compiled against eager decoding at batch 1 and larger batches, per model and weight scheme,
in turns, one JSON: `python -m pangu_tools.compiled_bench --model pangu-1b --scheme bf16,int8,int4
--batch 1,16 --json OUT` (tools/device_check.sh runs it on a GPU).

Decode speed is taken from greedy `generate` calls with eos off: (N - 1) / (t(N) - t(1)), where
t(n) is the median wall time of a call making n new tokens (the prefill and the final read-back
cancel). Batch throughput is rows x that. `roofline` is the share of the device's memory
bandwidth (`--peak-gbs`) a batch-1 step would need to read the weights once at that speed."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from .common import resolve_model, write_json


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pangu_tools.compiled_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="preset or folder (repeatable)")
    p.add_argument("--scheme", default="bf16", help="comma list of bf16, int8, int4 (weight-only, bf16 activations)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled rows")
    p.add_argument("--peak-gbs", type=float, default=None, help="memory bandwidth for the roofline column (GB/s)")
    p.add_argument("--json", dest="json_out", default="-", metavar="OUT")
    return p.parse_args(argv)


def timed(fn: Any, sync: Any) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def decode_rate(params: Any, cfg: Any, prompts: list[list[int]], n: int, repeats: int, compile: Any,
                sync: Any) -> float:
    """Tokens a second per row, (n - 1) / (t(n) - t(1)), medians over `repeats` (after one warmup
    each). Raises ConfigError when t(n) <= t(1) (a machine too noisy for this many tokens)."""
    import pangu_fn as pf
    from pangu_fn.errors import ConfigError

    def run(k: int) -> None:
        pf.generate(params, cfg, prompts, k, eos_token_ids=(), compile=compile)

    run(1), run(n)  # warmup: compiles every shape
    short = statistics.median(timed(lambda: run(1), sync) for _ in range(repeats))
    full = statistics.median(timed(lambda: run(n), sync) for _ in range(repeats))
    if full <= short:
        raise ConfigError(f"compiled_bench: {n} tokens took no longer than 1 ({full:.4f} s vs {short:.4f} s); "
                          "raise --new-tokens or --repeats")
    return (n - 1) / (full - short)


def main(argv: list[str] | None = None) -> int:
    import torch

    import pangu_fn as pf
    from pangu_fn import compiled
    from pangu_fn.quant import QuantRecipe, quantize

    args = parse(argv)
    device = pf.select_device(args.device)
    opts = compiled.CompileOptions(args.backend)
    rows: list[dict[str, Any]] = []
    head = {"command": "python -m pangu_tools.compiled_bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": pf.device_info(str(device))["name"], "torch": torch.__version__, "backend": args.backend,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats}
    for model in args.model:
        base, cfg, random = resolve_model(model, str(device), "bf16")
        for scheme in args.scheme.split(","):
            params = base if scheme == "bf16" else quantize(base, QuantRecipe(scheme, group_size=128))
            weight_bytes = pf.nbytes(params)
            for batch in (int(b) for b in args.batch.split(",")):
                gen = torch.Generator().manual_seed(batch)
                prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=gen).tolist()
                print(f"compiled_bench: {model} {scheme} batch {batch} ...", file=sys.stderr, flush=True)
                progs = compiled.programs(params, cfg, opts)
                before = progs.compile_s
                fast = decode_rate(params, cfg, prompts, args.new_tokens, args.repeats, opts,
                                   lambda: pf.synchronize(device))
                eager = decode_rate(params, cfg, prompts, args.new_tokens, args.repeats, False,
                                    lambda: pf.synchronize(device))
                row = {"model": model, "random_weights": random, "scheme": scheme, "batch": batch,
                       "weight_mb": round(weight_bytes / 2**20, 1),
                       "eager_tok_s": round(eager * batch, 2), "compiled_tok_s": round(fast * batch, 2),
                       "compiled_vs_eager": round(fast / eager, 3), "compile_s": round(progs.compile_s - before, 1)}
                if args.peak_gbs and batch == 1:
                    row["roofline_tok_s"] = round(args.peak_gbs * 1e9 / weight_bytes, 1)
                    row["compiled_vs_roofline"] = round(fast / row["roofline_tok_s"], 3)
                rows.append(row)
                print(f"  {row}", file=sys.stderr, flush=True)
                if args.json_out != "-":  # rewritten after each row: a run cut short keeps its rows
                    write_json({**head, "results": rows}, args.json_out)
            del params
    if args.json_out == "-":
        write_json({**head, "results": rows}, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
