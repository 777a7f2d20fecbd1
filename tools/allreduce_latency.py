"""Latency of one small all-reduce between two local gloo ranks, under the settings that might change it.

    python -m pangu_tools.allreduce_latency --numel 1536 --json out/allreduce.json

A tensor-parallel decode step makes `2 x blocks + 2` all-reduces of one hidden vector
(docs/distributed.md), so on one CPU their latency decides whether TP 2 keeps up with one
process. This spawns 2 ranks (`pangu_fn.distributed.launch`) and times `--calls` sums of a
`[numel]` tensor for every combination of:

- transport: gloo's `GLOO_DEVICE_TRANSPORT` (`TCP`, Linux's default, or `UV`, libuv), one
  process group of each in the same ranks;
- method: `c10d` (`dist.all_reduce` in place), `functional` (`_functional_collectives.all_reduce`
  + `wait_tensor`, what traced code runs), `all_gather` (`all_gather_single`, then a local sum:
  what `pangu_fn.distributed` runs eagerly on gloo at 2 ranks) and `send_recv`
  (`batch_isend_irecv` with the peer, then a local add);
- dtype (`--dtypes`), torch threads per rank (`--threads`);
- peer: `idle` (calls back to back) or `busy` (before every call both ranks run a decode-sized
  product, `[1, numel] @ [numel, 2 numel]`, as a decode step does between its collectives).

Settings are interleaved in `--rounds` rounds so a load change on a shared machine hits them
all alike. Each row: median and p90 microseconds of one call as rank 0 saw it; `step_us`, the
wall time of an iteration over a whole block (the ranks in lockstep, so a method whose last
arrival finds its data waiting is not flattered), `product_us`, the time in the block's
products, and `cost_us`, what the collective adds to an iteration (a block's wall time less
its products, per iteration; the median over rounds); CPU
microseconds the whole rank burned during a call (gloo's threads included); and `vs_base`,
`cost_us` over the `TCP` / `c10d` / 1-thread row's of the same dtype and peer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from typing import Any

TRANSPORTS = ("TCP", "UV")
METHODS = ("c10d", "functional", "all_gather", "send_recv")
PEERS = ("idle", "busy")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def _calls(method: str, group: Any, x: Any) -> Any:
    """A function running one sum of `x` over the 2 ranks of `group` by `method`."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    peer = 1 - dist.get_rank(group)
    gathered, other = torch.empty(2 * x.numel(), dtype=x.dtype), torch.empty_like(x)

    def c10d() -> Any:
        dist.all_reduce(x, group=group)
        return x

    def functional() -> Any:
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", group))

    def all_gather() -> Any:
        dist.all_gather_single(gathered, x, group=group)
        return gathered.view(2, -1).sum(0)

    def send_recv() -> Any:
        ops = [dist.P2POp(dist.isend, x, peer, group), dist.P2POp(dist.irecv, other, peer, group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return x + other

    return {"c10d": c10d, "functional": functional, "all_gather": all_gather, "send_recv": send_recv}[method]


def measure(rank: int, world: int, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """In each rank: time every setting's calls, interleaved over the rounds; rank 0's rows."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    groups = {}
    for transport in settings["transports"]:  # gloo reads the variable when a group makes its device
        os.environ["GLOO_DEVICE_TRANSPORT"] = transport
        groups[transport] = dist.new_group(backend="gloo")
    numel, calls = settings["numel"], settings["calls"]
    grid = list(itertools.product(settings["transports"], settings["methods"], settings["dtypes"],
                                  settings["threads"], settings["peers"]))
    gen = torch.Generator().manual_seed(rank)
    inputs = {d: torch.randn(numel, generator=gen).to(getattr(torch, DTYPES[d])) for d in settings["dtypes"]}
    weights = {d: (torch.randn(2 * numel, numel, generator=gen) / numel**0.5).to(inputs[d].dtype)
               for d in settings["dtypes"]}
    samples: dict[tuple, list[float]] = {key: [] for key in grid}  # one call each
    steps: dict[tuple, list[float]] = {key: [] for key in grid}  # a block's wall time per iteration
    products: dict[tuple, list[float]] = {key: [] for key in grid}  # the block's products, per iteration
    cpu: dict[tuple, float] = dict.fromkeys(grid, 0.0)
    for _ in range(settings["rounds"]):
        for key in grid:
            transport, method, dtype, threads, peer = key
            torch.set_num_threads(threads)
            x = inputs[dtype].clone()
            run = _calls(method, groups[transport], x)
            for _ in range(5):  # warm: buffers, pairs, thread pools
                x.copy_(inputs[dtype])
                run()
            dist.barrier(groups[transport])
            block, product = time.perf_counter(), 0.0
            for _ in range(calls):
                if peer == "busy":
                    start = time.perf_counter()
                    F.linear(inputs[dtype][None], weights[dtype])
                    product += time.perf_counter() - start
                x.copy_(inputs[dtype])
                cpu_start, start = time.process_time(), time.perf_counter()
                run()
                samples[key].append(time.perf_counter() - start)
                cpu[key] += time.process_time() - cpu_start
            steps[key].append((time.perf_counter() - block) / calls)
            products[key].append(product / calls)
    if settings["check"]:  # every method sums: the two ranks' inputs, added here by hand
        mine = inputs[settings["dtypes"][0]]
        theirs = torch.randn(numel, generator=torch.Generator().manual_seed(1 - rank)).to(mine.dtype)
        for method in settings["methods"]:
            got = _calls(method, groups[settings["transports"][0]], mine.clone())()
            if not torch.allclose(got.float(), (mine.float() + theirs.float()).to(mine.dtype).float(), atol=5e-2):
                raise AssertionError(f"{method}: the sum differs from the inputs added by hand")
    rows = []
    for key, times in samples.items():
        transport, method, dtype, threads, peer = key
        step, product = _median(steps[key]), _median(products[key])
        rows.append({"transport": transport, "method": method, "dtype": dtype, "threads": threads, "peer": peer,
                     "median_us": round(1e6 * _median(times), 1),
                     "p90_us": round(1e6 * sorted(times)[int(0.9 * (len(times) - 1))], 1),
                     "step_us": round(1e6 * step, 1), "product_us": round(1e6 * product, 1),
                     "cost_us": round(1e6 * _median([a - b for a, b in zip(steps[key], products[key])]), 1),
                     "cpu_us_per_call": round(1e6 * cpu[key] / len(times), 1)})
    return rows


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with `vs_base`: its `cost_us` over the TCP / c10d / 1-thread row's of its dtype
    and peer (the first transport, method and thread count measured, when those were left out)."""
    first = rows[0]
    base = {(r["dtype"], r["peer"]): r["cost_us"] for r in rows
            if (r["transport"], r["method"], r["threads"]) == (first["transport"], first["method"], first["threads"])}
    return [{**r, "vs_base": round(r["cost_us"] / base[(r["dtype"], r["peer"])], 2)} for r in rows]


def _list(choices: Any) -> Any:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(choices)}, found {text!r}")
        return items
    return parse


def _threads(text: str) -> list[int]:
    if not all(t.isdigit() and int(t) >= 1 for t in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts >= 1, found {text!r}")
    return [int(t) for t in text.split(",")]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pangu_tools.allreduce_latency", description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=1536, help="values summed per call (default 1536: openpangu-1b's hidden)")
    p.add_argument("--calls", type=int, default=40, help="timed calls per setting and round (default 40)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over all settings (default 5)")
    p.add_argument("--transports", type=_list(TRANSPORTS), default=list(TRANSPORTS), help="TCP,UV (default both)")
    p.add_argument("--methods", type=_list(METHODS), default=list(METHODS), help=f"{','.join(METHODS)} (default all)")
    p.add_argument("--dtypes", type=_list(DTYPES), default=list(DTYPES), help="fp32,bf16 (default both)")
    p.add_argument("--threads", type=_threads, default=[1, 2], help="torch threads per rank (default 1,2)")
    p.add_argument("--peers", type=_list(PEERS), default=list(PEERS), help="idle,busy (default both)")
    p.add_argument("--json", default=None, help="write the rows here (default: stdout)")
    args = p.parse_args(argv)
    if args.numel < 1 or args.calls < 1 or args.rounds < 1:
        p.error("--numel, --calls and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pangu_fn.distributed import launch

    from .common import write_json

    settings = {k: getattr(args, k) for k in ("numel", "calls", "rounds", "transports", "methods", "dtypes",
                                              "threads", "peers")}
    settings["check"] = True
    print(f"allreduce_latency: {args.rounds} rounds x {args.calls} calls x "
          f"{len(list(itertools.product(*(settings[k] for k in ('transports', 'methods', 'dtypes', 'threads', 'peers')))))}"
          " settings on 2 gloo ranks ...", file=sys.stderr, flush=True)
    rows = with_ratios(launch(measure, 2, settings, threads=1)[0])
    for r in rows:
        print(f"{r['transport']:>3} {r['method']:>10} {r['dtype']} threads={r['threads']} {r['peer']:>4}: "
              f"call median {r['median_us']:7.1f} p90 {r['p90_us']:7.1f}  cost {r['cost_us']:7.1f} "
              f"(step {r['step_us']:7.1f} - product {r['product_us']:6.1f})  cpu {r['cpu_us_per_call']:7.1f} us/call  "
              f"x{r['vs_base']:.2f}", file=sys.stderr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    write_json({"numel": args.numel, "calls_per_setting": args.calls * args.rounds, "cpu_count": os.cpu_count(),
                "load_average_1m": load, "machine": platform.processor() or platform.machine(), "rows": rows},
               args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
