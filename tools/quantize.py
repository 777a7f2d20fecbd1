"""`pangu quantize SRC DST --scheme ...`: quantize a model folder (or a preset's random
weights), save it beside a copy of the tokenizer, and print what it cost: stored bytes before
and after per tensor kind, the compression ratio and held-out perplexity before and after
(written as JSON with --report)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

RECIPE_KEYS = ("scheme", "group_size", "symmetric", "keep", "overrides", "head", "compute_dtype", "prepack", "damp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model: int8, int4, gptq (calibrated int4), fp16, bf16")
    p.add_argument("src", metavar="SRC", help="model folder or preset name (random weights)")
    p.add_argument("dst", metavar="DST", help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (only a model folder or bundle; never SRC or a folder holding it)")
    p.add_argument("--scheme", default=None, help="int8 | int4 | gptq | fp16 | bf16")
    p.add_argument("--group-size", type=int, default=None, help="int4 / gptq group along K: 32 | 64 | 128 (default 128)")
    p.add_argument("--asym", action="store_true", default=None, help="int4 / gptq with zero points (default symmetric)")
    p.add_argument("--keep", action="append", default=None, metavar="PATTERN",
                   help="leave block linears matching this glob in the compute dtype (e.g. '*.down'); repeatable")
    p.add_argument("--override", action="append", default=None, metavar="PATTERN=CHOICE",
                   help="per-layer scheme, CHOICE int8 | int4 | gptq | keep (e.g. '*.down=int8'); repeatable")
    p.add_argument("--head", default=None, choices=["keep", "int8", "int4"],
                   help="LM head (a tied model's embedding): keep in the compute dtype (default) or quantize")
    p.add_argument("--compute-dtype", default=None, help="activation dtype: bf16 (default) | fp16 | fp32")
    p.add_argument("--no-prepack", dest="prepack", action="store_false", default=None,
                   help="leave float linears as plain tensors (no DenseWeight leaves)")
    p.add_argument("--recipe", default=None, metavar="FILE.json",
                   help=f"recipe as JSON (keys {', '.join(RECIPE_KEYS)}); flags given override it")
    p.add_argument("--calib", default="stdlib", metavar="SOURCE",
                   help="gptq calibration text: a .txt or .jsonl documents file, 'stdlib' (the demo corpus's "
                        "training documents, default) or 'random' token ids")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="held-out .txt / .jsonl for perplexity (default: heldout.jsonl beside SRC, if any)")
    p.add_argument("--eval-tokens", type=int, default=None, help="use only the first N held-out tokens")
    p.add_argument("--eval-seq-len", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--no-eval", action="store_true", help="skip held-out perplexity")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights-seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--report", default=None, metavar="OUT.json", help="write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace) -> Any:
    """A QuantRecipe from --recipe FILE.json, then the flags that were given. Raises ConfigError."""
    from pangu_fn.errors import ConfigError
    from pangu_fn.quant import QuantRecipe, parse_override

    fields: dict[str, Any] = {}
    if args.recipe:
        try:
            fields = json.loads(Path(args.recipe).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--recipe {args.recipe}: expected a readable JSON object ({e})") from None
        unknown = sorted(set(fields) - set(RECIPE_KEYS)) if isinstance(fields, dict) else ["(not an object)"]
        if unknown:
            raise ConfigError(f"--recipe {args.recipe}: unknown keys {unknown}; expected some of {list(RECIPE_KEYS)}")
        fields["keep"] = tuple(fields.get("keep", ()))
        fields["overrides"] = tuple(tuple(o) for o in fields.get("overrides", ()))
    given = {"scheme": args.scheme, "group_size": args.group_size, "head": args.head,
             "compute_dtype": args.compute_dtype, "prepack": args.prepack,
             "symmetric": None if args.asym is None else not args.asym,
             "keep": None if args.keep is None else tuple(args.keep),
             "overrides": None if args.override is None else tuple(parse_override(o) for o in args.override)}
    fields.update({k: v for k, v in given.items() if v is not None})
    if "scheme" not in fields:
        raise ConfigError("pangu quantize: expected --scheme (int8 | int4 | gptq | fp16 | bf16) or a --recipe with one")
    try:
        return QuantRecipe(**fields)
    except TypeError as e:
        raise ConfigError(f"--recipe {args.recipe}: {e}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    import pangu_fn as pf
    from pangu_fn.evaluate import perplexity
    from pangu_fn.io.destination import check_destination
    from pangu_fn.quant import calibration_windows, quantize, size_report
    from pangu_fn.tokenizer import find_tokenizer, load_tokenizer

    from .common import resolve_model, write_json
    from .prune import calibration_tokens, default_eval_file, read_text_tokens

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)  # a bad recipe fails before any loading
    check_destination(args.dst, overwrite=args.overwrite, sources=[args.src] if Path(args.src).exists() else [])
    params, cfg, random_weights = resolve_model(args.src, args.device, None, args.weights_seed)
    tok_file = find_tokenizer(args.src) if Path(args.src).is_dir() else None
    tokenizer = load_tokenizer(tok_file) if tok_file else None
    eval_file = None if args.no_eval else (args.eval_text or default_eval_file(args.src))
    eval_ids = None
    if eval_file:
        if tokenizer is None:
            raise pf.ConfigError(f"--eval-text needs a tokenizer beside {args.src!r}")
        eval_ids = read_text_tokens(eval_file, tokenizer)[: args.eval_tokens]
    calib = None
    if recipe.calibrated:
        stream = calibration_tokens(args.calib, args.src, cfg, tokenizer, 0)
        seq_len = min(args.calib_seq_len, cfg.max_seq_len)
        calib = calibration_windows(stream, seq_len, args.calib_samples)
    progress = not args.no_progress
    print(f"pangu quantize: {recipe.summary()} on {args.src}{' (random weights)' if random_weights else ''}",
          file=sys.stderr)

    start = time.perf_counter()
    out = quantize(params, recipe, cfg=cfg, calib=calib, progress=progress)
    seconds = time.perf_counter() - start
    sizes = size_report(params, out)
    ppl = None
    if eval_ids is not None:
        seq = min(args.eval_seq_len, cfg.max_seq_len - 1)
        ppl = {"before": perplexity(params, cfg, eval_ids, seq, progress=progress, desc="perplexity before"),
               "after": perplexity(out, cfg, eval_ids, seq, progress=progress, desc="perplexity after")}
        ppl["change"] = ppl["after"] / ppl["before"] - 1.0
    extra = {tok_file.name: tok_file.read_bytes()} if tok_file else None
    pf.save(args.dst, out, cfg, extra_files=extra, overwrite=args.overwrite)

    print(format_report(sizes, ppl, recipe))
    if ppl is not None:
        print(f"(perplexity on {len(eval_ids):,} tokens of {eval_file}, windows of "
              f"{min(args.eval_seq_len, cfg.max_seq_len - 1)})")
    print(f"saved {args.dst} ({seconds:.1f} s to quantize)")
    if args.report:
        write_json({"src": args.src, "dst": args.dst, "random_weights": random_weights,
                    "recipe": recipe.describe(), "seconds": round(seconds, 2), **sizes,
                    "perplexity": ppl, "eval_file": str(eval_file) if ppl else None,
                    "eval_tokens": len(eval_ids) if eval_ids is not None else None,
                    "calibration": None if calib is None else {"source": args.calib, "windows": list(calib.shape)},
                    "torch": torch.__version__}, args.report)
    return 0


def format_report(sizes: dict[str, Any], ppl: dict[str, float] | None, recipe: Any) -> str:
    mb = lambda n: f"{n / 2**20:10.2f}"
    lines = [f"{'tensor kind':<12}{'tensors':>8}{'MiB before':>12}{'MiB after':>12}{'ratio':>8}  stored as"]
    for r in sizes["kinds"]:
        schemes = ", ".join(f"{k} x{v}" for k, v in r["schemes_after"].items())
        lines.append(f"{r['kind']:<12}{r['tensors']:>8}  {mb(r['bytes_before'])}  {mb(r['bytes_after'])}"
                     f"{r['ratio']:>8.2f}  {schemes}")
    lines.append(f"{'total':<12}{'':>8}  {mb(sizes['bytes_before'])}  {mb(sizes['bytes_after'])}"
                 f"{sizes['compression']:>8.2f}  compression {sizes['compression']:.2f}x")
    extra = sizes["resident_bytes_after"] - sizes["bytes_after"]
    if extra > 0:
        lines.append(f"in memory: {sizes['resident_bytes_after'] / 2**20:.2f} MiB (+{extra / 2**20:.2f} MiB of "
                     "kernel copies: without the native kernels, e.g. a tied bf16 head held plain and "
                     "prepacked; --head int8 avoids it)")
    if ppl is not None:
        lines.append(f"held-out perplexity: {ppl['before']:.3f} before, {ppl['after']:.3f} after "
                     f"({ppl['change']:+.2%})")
    return "\n".join(lines)
