"""`pangu bench --gguf [DIR]`: llama.cpp (through llama-cpp-python) beside pangu-fn on the same
weights, decoding the same prompt greedily.

The model is written as one GGUF file per `--gguf-types` entry (to DIR, default a temporary
folder), each decoded by llama.cpp and, on the matching tree, by pangu-fn, taking turns
(`measure_interleaved`) so a busy machine slows both alike:

    f32   vs our fp32
    q8_0  vs our int8 (per output channel; the q8_0 file is written from that int8 tree)
    q4_0  vs our int4 (groups of 32, symmetric: written directly, so both run the same weights)

The LM head (a tied model's embedding) is quantized like the blocks on both sides, as llama.cpp
stores `token_embd` in the file's type.

Each llama.cpp row says whether its greedy tokens equal ours on the prompt (`same_tokens`; for
q8_0 / q4_0 llama.cpp also rounds the activations to 8 bits inside its dot products, ours stay
fp32, so long greedy runs may part) and its decode speed over ours (`vs_pangu_fn`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GGUF_BENCH_TYPES = ("f32", "q8_0", "q4_0")
LLAMA_EXTRA = "pip install 'pangu-fn[llama]' (builds llama.cpp; see docs/export.md)"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gguf", nargs="?", const="", default=None, metavar="DIR",
                   help="also write the weights as GGUF (to DIR, default a temporary folder) and time llama.cpp "
                        "(llama-cpp-python) against pangu-fn on them: f32 / q8_0 / q4_0 vs fp32 / int8 / int4")
    p.add_argument("--gguf-types", default=",".join(GGUF_BENCH_TYPES), metavar="LIST",
                   help=f"--gguf rows: comma list of {', '.join(GGUF_BENCH_TYPES)}")


def our_tree(params: Any, type: str) -> tuple[Any, str]:
    """(pangu-fn's tree matching a GGUF type, its label)."""
    import pangu_fn as pf
    from pangu_fn.quant import QuantRecipe, quantize

    tree = pf.astype(params, "fp32")
    if type == "q8_0":
        return quantize(tree, QuantRecipe("int8", head="int8", compute_dtype="fp32")), "int8"
    if type == "q4_0":
        recipe = QuantRecipe("int4", group_size=32, symmetric=True, head="int4", compute_dtype="fp32")
        return quantize(tree, recipe), "int4-g32"
    return tree, "fp32"


def llama_engine(llm: Any) -> Any:
    """An `Engine` (see bench.py) decoding greedily with llama.cpp."""

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        llm.reset()  # else `generate` keeps the previous prompt's longest prefix and skips its prefill
        start, stamps = time.perf_counter(), []
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return start, stamps

    return run


def greedy_tokens_llama(llm: Any, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def gguf_rows(params: Any, cfg: Any, args: argparse.Namespace, prompt: list[int], pangu_engine: Any) -> list[dict[str, Any]]:
    """The rows described in the module docstring ([] without --gguf). Raises ConfigError when
    llama-cpp-python is not installed or a type is unknown."""
    if args.gguf is None:
        return []
    from pangu_fn.errors import ConfigError

    wanted = [s.strip() for s in args.gguf_types.split(",") if s.strip()]
    if not wanted or any(s not in GGUF_BENCH_TYPES for s in wanted):
        raise ConfigError(f"--gguf-types {args.gguf_types!r}: expected a comma list of {list(GGUF_BENCH_TYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError(f"--gguf needs llama-cpp-python: {LLAMA_EXTRA}") from None
    from pangu_export.gguf import export_gguf

    import pangu_fn as pf
    from pangu_fn.tokenizer import find_tokenizer

    from .bench import measure_interleaved

    folder = Path(args.model)
    tokenizer = folder if folder.is_dir() and find_tokenizer(folder) is not None else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.gguf) if args.gguf else Path(tmp)
        for type in wanted:
            tree, label = our_tree(params, type)
            path = root / f"model-{type}.gguf"
            print(f"bench: writing {path} and timing llama.cpp vs pangu-fn {label} ...", file=sys.stderr, flush=True)
            summary = export_gguf(tree, cfg, path, type, tokenizer=tokenizer, progress=False, overwrite=True)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + args.new_tokens + 8, n_batch=512,
                                  n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            ours = [e.token for e in pf.stream(tree, cfg, [prompt], args.new_tokens, eos_token_ids=())]
            same = greedy_tokens_llama(llm, prompt, args.new_tokens) == ours
            r_ours, r_llama = measure_interleaved([pangu_engine(tree, cfg), llama_engine(llm)], prompt,
                                                  args.new_tokens, args.repeats, args.warmup, rotate=True)
            rows.append({"engine": "pangu-fn", "dtype": label, "gguf_pair": type, **r_ours})
            rows.append({"engine": "llama.cpp", "dtype": type, "gguf": path.name, "gguf_mib": round(path.stat().st_size / 2**20, 2),
                         "same_tokens": same, "vs_pangu_fn": round(r_llama["decode_tok_s"] / r_ours["decode_tok_s"], 3),
                         "llama_cpp_python": llama_cpp.__version__, "notes": summary.notes, **r_llama})
            del llm
    return rows
