"""`pangu serve-bench URL`: drive an OpenAI-compatible server (ours, llama-server, vLLM) with a
fixed set of streamed token-id completions at several concurrencies, and report what `vllm
bench serve` reports: request throughput, output tokens/s, time to first token and
inter-token latency (p50 / p99), end-to-end latency."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from typing import Any

from .common import write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve-bench", help="load-test an OpenAI-compatible server (token-id completions)")
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000 (with or without /v1)")
    p.add_argument("--model", default=None, help="the model name to send (default: the first of GET /v1/models)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once (default 1 4 16)")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default 64)")
    p.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens every request shares")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    p.add_argument("--vocab", type=int, default=1000, help="prompt ids are drawn below this (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request set")
    p.add_argument("--api-key", default=None)
    p.add_argument("--extra-body", type=json.loads, default=None, metavar="JSON",
                   help='fields added to every request, e.g. \'{"ignore_eos": true}\' for llama-server')
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    p.set_defaults(func=run)


def requests(args: argparse.Namespace, level: int | str = 0) -> list[list[int]]:
    """The fixed prompt set of one concurrency level: `shared_prefix` common ids (the same at
    every level), then random ids seeded by (seed, level), so that a server's prefix cache never
    holds a whole prompt from an earlier level."""
    rng = random.Random(args.seed)
    prefix = [rng.randrange(10, args.vocab) for _ in range(args.shared_prefix)]
    rng = random.Random(f"{args.seed}:{level}")
    return [prefix + [rng.randrange(10, args.vocab) for _ in range(args.prompt_len - args.shared_prefix)]
            for _ in range(args.requests)]


async def one(client: Any, model: str, prompt: list[int], max_tokens: int,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed completion: arrival-to-first-token, the gaps between tokens, the end. As
    `vllm bench serve` does, a token is stamped when a chunk brings text (a server may hold back
    an unfinished UTF-8 character or send an empty closing chunk), and the tokens counted are
    the server's `usage.completion_tokens` (the stamps where it sends no usage). `extra` fields
    are added to the body (e.g. llama-server's `ignore_eos`)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    start = time.perf_counter()
    stamps, usage = [], None
    async with client.stream("POST", "completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices") or []):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or usage
    if not stamps:
        return {"error": "no tokens"}
    tokens = usage["completion_tokens"] if usage and "completion_tokens" in usage else len(stamps)
    return {"ttft": stamps[0] - start, "itl": [b - a for a, b in itertools.pairwise(stamps)],
            "e2e": stamps[-1] - start, "tokens": tokens}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def level(url: str, model: str, prompts: list[list[int]], warm_up: list[int], max_tokens: int,
                concurrency: int, headers: dict[str, str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    gate = asyncio.Semaphore(concurrency)

    async def bounded(client: Any, prompt: list[int]) -> dict[str, Any]:
        async with gate:
            return await one(client, model, prompt, max_tokens, extra)

    # a connection per request: llama-server may close a kept-alive one after a stream
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as client:
        await one(client, model, warm_up, 2, extra)
        start = time.perf_counter()
        results = await asyncio.gather(*[bounded(client, p) for p in prompts])
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(v * 1000, 2)
    itl = [x for r in ok for x in r["itl"]]
    return {"concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "seconds": round(wall, 3),
            "request_throughput": round(len(ok) / wall, 3), "output_tokens": tokens,
            "tokens_per_request": [min((r["tokens"] for r in ok), default=0),
                                   max((r["tokens"] for r in ok), default=0)],
            "output_tokens_per_s": round(tokens / wall, 2),
            "ttft_ms": {"mean": ms(statistics.fmean([r["ttft"] for r in ok])) if ok else None,
                        "p50": ms(pct([r["ttft"] for r in ok], 50)), "p99": ms(pct([r["ttft"] for r in ok], 99))},
            "itl_ms": {"mean": ms(statistics.fmean(itl)) if itl else None, "p50": ms(pct(itl, 50)),
                       "p99": ms(pct(itl, 99))},
            "e2e_ms": {"p50": ms(pct([r["e2e"] for r in ok], 50)), "p99": ms(pct([r["e2e"] for r in ok], 99))}}


def run(args: argparse.Namespace) -> int:
    write_json(measure(args), args.out)
    return 0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The report of `run` (the arguments of `register`). Raises InputError for bad sizes."""
    check(args)
    url = api_url(args.url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or served_model(url, headers)
    rows = with_ratios([measure_level(args, url, model, headers, i, c) for i, c in enumerate(args.concurrency)])
    return {"command": "pangu " + " ".join(sys.argv[1:]), "url": args.url, "model": model, "requests": args.requests,
            "prompt_len": args.prompt_len, "shared_prefix": args.shared_prefix, "max_tokens": args.max_tokens,
            "extra_body": args.extra_body, "levels": rows}


def check(args: argparse.Namespace) -> None:
    from pangu_fn.errors import InputError

    if args.prompt_len < 1 or args.max_tokens < 1 or args.requests < 1 or not 0 <= args.shared_prefix <= args.prompt_len:
        raise InputError("serve-bench: expected --prompt-len, --max-tokens, --requests >= 1 and "
                         f"0 <= --shared-prefix <= --prompt-len, found {args.prompt_len}, {args.max_tokens}, "
                         f"{args.requests}, {args.shared_prefix}")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise InputError(f"serve-bench: --extra-body: expected a JSON object, found {args.extra_body!r}")


def api_url(url: str) -> str:
    """'http://h:p' or 'http://h:p/v1/' -> 'http://h:p/v1/'."""
    url = url.rstrip("/")
    return (url if url.endswith("/v1") else url + "/v1") + "/"


def served_model(url: str, headers: dict[str, str] | None = None) -> str:
    """The first model id of GET /v1/models (`url` as `api_url` gives it)."""
    import httpx

    return httpx.get(url + "models", headers=headers or {}, timeout=60).json()["data"][0]["id"]


def measure_level(args: argparse.Namespace, url: str, model: str, headers: dict[str, str], index: int,
                  concurrency: int) -> dict[str, Any]:
    """One row: the `index`-th request set at `concurrency` clients, after a 2-token warm-up."""
    warm_up = requests(args, f"warm-up {index}")[0]  # shares only the common prefix with the measured ones
    row = asyncio.run(level(url, model, requests(args, index), warm_up, args.max_tokens, concurrency, headers,
                            args.extra_body))
    print(f"concurrency {concurrency}: {row['output_tokens_per_s']} tok/s, TTFT p50 {row['ttft_ms']['p50']} ms, "
          f"ITL p50 {row['itl_ms']['p50']} ms p99 {row['itl_ms']['p99']} ms, failed {row['failed']}", file=sys.stderr)
    return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds tokens/s and ITL p50 over the first row's to every row (in place; returns them)."""
    base = rows[0]
    for row in rows:
        if base["output_tokens_per_s"]:
            row["tokens_per_s_vs_first"] = round(row["output_tokens_per_s"] / base["output_tokens_per_s"], 2)
        if base["itl_ms"]["p50"] and row["itl_ms"]["p50"]:
            row["itl_p50_vs_first"] = round(row["itl_ms"]["p50"] / base["itl_ms"]["p50"], 2)
    return rows
