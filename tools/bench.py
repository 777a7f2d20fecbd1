"""`pangu bench`: prefill latency and batch-1 decode speed, medians of repeats, with ratios
against the first row (the baseline) measured in the same run."""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from . import gguf_bench, ort_bench, peers_bench, quant_bench, spec_bench, tensor_parallel
from .common import add_model_args, resolve_model, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill ms and decode tokens/s")
    add_model_args(p)
    p.add_argument("--compare", choices=["hf"], action="append", default=[],
                   help="also run the same weights in transformers (hf) in this process")
    p.add_argument("--prune-structured", default=None, metavar="heads=F,ffn=F",
                   help="also run a structurally pruned copy (magnitude importance, every layer alike)")
    quant_bench.add_args(p)
    spec_bench.add_args(p)
    ort_bench.add_args(p)
    gguf_bench.add_args(p)
    peers_bench.add_args(p)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time compiled decoding in turns with eager decoding, with the compile seconds: "
                        "a comma list of inductor (default), aot (AOTInductor packages cached on disk), "
                        "inductor-pywrapper, aot_eager, eager")
    p.add_argument("--unfused", action="store_true",
                   help="also time decoding with the fused native step off (the PyTorch blocks) in turns with it")
    tensor_parallel.add_args(p)  # --tp N: N ranks of threads // N threads against one process
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write the results as JSON ('-' = stdout)")
    p.set_defaults(func=run)


# An engine: prompt ids, new-token count -> list of token timestamps, the first taken
# right after prefill (seconds, from time.perf_counter) plus the start time.
Engine = Callable[[list[int], int], tuple[float, list[float]]]


def measure(engine: Engine, prompt: list[int], new_tokens: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Median prefill ms and decode tokens/s over `repeats` runs after `warmup` runs."""
    return measure_interleaved([engine], prompt, new_tokens, repeats, warmup)[0]


def measure_interleaved(engines: list[Engine], prompt: list[int], new_tokens: int, repeats: int,
                        warmup: int, rotate: bool = False) -> list[dict[str, Any]]:
    """`measure` for several engines taking turns (each runs once per repeat), so that a slow
    spell of the machine hits them alike; with `rotate`, repeat i starts with engine i (mod n).
    One result per engine, in order."""
    prefill: list[list[float]] = [[] for _ in engines]
    decode: list[list[float]] = [[] for _ in engines]
    for i in range(warmup + repeats):
        first = i % len(engines) if rotate else 0
        for j in [*range(first, len(engines)), *range(first)]:
            start, stamps = engines[j](prompt, new_tokens)
            if i < warmup:
                continue
            prefill[j].append((stamps[0] - start) * 1e3)
            decode[j].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return [{"prefill_ms": round(statistics.median(p), 2),
             "decode_tok_s": round(statistics.median(d), 2),
             "ms_per_token": round(1e3 / statistics.median(d), 3),
             "runs": {"prefill_ms": [round(x, 2) for x in p], "decode_tok_s": [round(x, 2) for x in d]}}
            for p, d in zip(prefill, decode)]


def pangu_engine(params: Any, cfg: Any, **stream_kw: Any) -> Engine:
    import pangu_fn as pf

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        stamps = [time.perf_counter() for _ in pf.stream(params, cfg, [prompt], n, eos_token_ids=(), **stream_kw)]
        return start, stamps

    return run


def hf_engine(params: Any, cfg: Any) -> Engine:
    """The same weights in transformers (GPT2LMHeadModel or LlamaForCausalLM), timed by a
    streamer callback on each generated token."""
    import torch
    import transformers

    from pangu_fn.io.hf import to_hf

    state, hf_cfg = to_hf(params, cfg)
    dtype = next(iter(state.values())).dtype
    config_cls = transformers.GPT2Config if hf_cfg["model_type"] == "gpt2" else transformers.LlamaConfig
    model_cls = transformers.GPT2LMHeadModel if hf_cfg["model_type"] == "gpt2" else transformers.LlamaForCausalLM
    config = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = model_cls(config)
    model.load_state_dict(state, assign=True, strict=False)
    model = model.to(dtype).eval()
    if cfg.tie_embeddings:
        model.tie_weights()

    class Stamps(transformers.generation.streamers.BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.first = True

        def put(self, value: Any) -> None:
            if self.first:  # the prompt itself is put once before any new token
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        ids = torch.tensor([prompt])
        streamer = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                           pad_token_id=0, attention_mask=torch.ones_like(ids))
        return start, streamer.times

    return run


def pruned_engine(params: Any, cfg: Any, spec: str) -> tuple[str, Engine, dict[str, Any]]:
    """A structurally pruned copy of the weights (`spec` "heads=F,ffn=F": fractions of KV groups
    and FFN neurons removed from every block by magnitude), its engine and its sizes."""
    from pangu_fn.prune import PruneRecipe, parse_structured, prune

    pruned, report = prune(params, PruneRecipe("structured", **parse_structured(spec)), cfg=cfg)
    info = {"spec": spec, "parameters_before": report.parameters["before"], "parameters_after": report.parameters["after"],
            "bytes_before": report.bytes["before"], "bytes_after": report.bytes["after"],
            "widths": [{k: r[k] for k in ("heads_after", "kv_heads_after", "ffn_after")} for r in report.removed.values()]}
    return f"pangu-fn pruned {spec}", pangu_engine(pruned, cfg), info


# `--compile` names beyond torch.compile's backends: inductor with Python wrapper code.
BENCH_COMPILE = {"inductor-pywrapper": {"backend": "inductor", "cpp_wrapper": False}}


def compile_names(args: argparse.Namespace) -> list[str]:
    """The `--compile` entries ([] without it)."""
    return [s.strip() for s in (args.compile or "").split(",") if s.strip()]


def compile_options(name: str) -> Any:
    """The CompileOptions a `--compile` entry names. Raises ConfigError for an unknown one."""
    from pangu_fn import compiled

    return compiled.CompileOptions(**BENCH_COMPILE[name]) if name in BENCH_COMPILE else compiled.options(name)


def compiled_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int], dtype: str) -> list[dict[str, Any]]:
    """Compiled decoding, one row per `--compile` entry (a comma list of inductor, aot,
    inductor-pywrapper, aot_eager, eager), all timed in turns with eager decoding (at least one
    warmup run each, which compiles), with the seconds spent compiling (tracing and code
    generation, or loading it from an on-disk cache: torch's, or the AOT packages)."""
    from pangu_fn import compiled

    names = compile_names(args)
    opts = [compile_options(n) for n in names]
    print(f"bench: pangu-fn compiled ({', '.join(names)}) in turns with eager ...", file=sys.stderr, flush=True)
    eager, *fast = measure_interleaved([pangu_engine(params, cfg), *(pangu_engine(params, cfg, compile=o) for o in opts)],
                                       prompt, args.new_tokens, args.repeats, max(1, args.warmup), rotate=True)
    return [{"engine": f"pangu-fn compiled {name}", "dtype": dtype, **row,
             "compile_s": round(compiled.programs(params, cfg, o).compile_s, 2),
             "in_turns": {"eager_decode_tok_s": eager["decode_tok_s"], "decode_tok_s": row["decode_tok_s"],
                          "decode_vs_eager": round(row["decode_tok_s"] / eager["decode_tok_s"], 3)}}
            for name, o, row in zip(names, opts, fast)]


def unfused_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int], dtype: str) -> list[dict[str, Any]]:
    """Decoding with the fused native step off (`native_step.disabled()`: every block through
    PyTorch's operators), timed in turns with the default, as `--unfused` asks."""
    from pangu_fn import native_step

    fused_engine = pangu_engine(params, cfg)

    def unfused(prompt: list[int], n: int) -> tuple[float, list[float]]:
        with native_step.disabled():
            return fused_engine(prompt, n)

    print("bench: pangu-fn with and without the fused step, in turns ...", file=sys.stderr, flush=True)
    fused, plain = measure_interleaved([fused_engine, unfused], prompt, args.new_tokens, args.repeats,
                                       max(1, args.warmup), rotate=True)
    return [{"engine": "pangu-fn unfused", "dtype": dtype, **plain,
             "in_turns": {"fused_decode_tok_s": fused["decode_tok_s"], "decode_tok_s": plain["decode_tok_s"],
                          "fused_vs_unfused": round(fused["decode_tok_s"] / plain["decode_tok_s"], 3)}}]


def run(args: argparse.Namespace) -> int:
    import torch

    import pangu_fn as pf
    from pangu_fn import native

    if args.tp > 1:
        from . import tp_bench

        return tp_bench.run(args, measure, pangu_engine)
    torch.set_num_threads(args.threads)
    params, cfg, random = resolve_model(args.model, args.device, args.dtype, args.weights_seed)
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
    dtype = str(pf.cache.compute_dtype(params)).replace("torch.", "")

    engines: list[tuple[str, Engine]] = [("pangu-fn", pangu_engine(params, cfg))]
    if "hf" in args.compare:
        engines.append(("transformers", hf_engine(params, cfg)))
    pruned_info = None
    if args.prune_structured:
        name, engine, pruned_info = pruned_engine(params, cfg, args.prune_structured)
        engines.append((name, engine))
    rows = []
    for name, engine in engines:
        print(f"bench: {name} ({dtype}) ...", file=sys.stderr, flush=True)
        rows.append({"engine": name, "dtype": dtype, **measure(engine, prompt, args.new_tokens, args.repeats, args.warmup)})
    if args.unfused:
        rows += unfused_rows(params, cfg, args, prompt, dtype)
    if args.compile:
        rows += compiled_rows(params, cfg, args, prompt, dtype)
    rows += quant_bench.scheme_rows(params, cfg, args, prompt, measure, pangu_engine)
    rows += spec_bench.spec_rows(params, cfg, args, measure, pangu_engine)
    rows += ort_bench.bundle_rows(params, cfg, args, prompt)
    rows += ort_bench.in_process_rows(params, cfg, args, prompt, pangu_engine)
    rows += gguf_bench.gguf_rows(params, cfg, args, prompt, pangu_engine)
    peers = peers_bench.prepare(params, cfg, args, prompt)  # with --peers: the fp32 tree saved for the children
    parameters = pf.count_params(params)
    del params, engines, engine  # no model is held here while the peers' child processes build and run
    rows += peers_bench.peer_rows(peers, args, prompt)
    base = rows[0]
    hf_row = next((r for r in rows if r["engine"] == "transformers"), None)
    for row in rows:
        row["decode_vs_first"] = round(row["decode_tok_s"] / base["decode_tok_s"], 3)
        if hf_row is not None:
            row["decode_vs_transformers"] = round(row["decode_tok_s"] / hf_row["decode_tok_s"], 3)
    for row in rows[1:]:
        row["first_decode_vs_this"] = round(base["decode_tok_s"] / row["decode_tok_s"], 3)
    result = {"command": "pangu " + " ".join(_shown(sys.argv[1:], args)) if sys.argv[0].endswith("pangu") else None,
              "model": args.model, "random_weights": random, "parameters": parameters,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "threads": args.threads, "device": pf.device_info(args.device)["name"],
              "torch": torch.__version__, "python": platform.python_version(), "kernels": native.status(),
              "peak_rss_mb": round(pf.memory_stats("cpu")["peak_rss"] / 2**20, 1), "results": rows}
    if pruned_info:
        result["pruned"] = pruned_info
    for row in rows:
        print(f"{row['engine']:>14} {row['dtype']:>8}  prefill {row['prefill_ms']:8.2f} ms   "
              f"decode {row['decode_tok_s']:8.2f} tok/s   x{row['decode_vs_first']:.3f} vs {base['engine']}",
              file=sys.stderr)
    if args.json_out:
        write_json(result, args.json_out)
    return 0


def _shown(argv: list[str], args: argparse.Namespace) -> list[str]:
    """The command line for the JSON, with the --peers folder written DIR (a path of this machine)."""
    return ["DIR" if args.peers and a == args.peers else a for a in argv]
