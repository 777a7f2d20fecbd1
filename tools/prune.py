"""`pangu prune SRC DST`: prune a model folder (or a preset's random weights), save the result
beside a copy of the tokenizer, print the report (and write it as JSON with --report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model: magnitude, wanda, n:m, structured, iterative")
    p.add_argument("src", metavar="SRC", help="model folder or preset name (random weights)")
    p.add_argument("dst", metavar="DST", help="output model folder (written atomically)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST (only a model folder or bundle; never SRC or a folder holding it)")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "n:m", "structured", "iterative"])
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights to zero (default 0.5)")
    p.add_argument("--granularity", choices=["layer", "global", "row"], default=None,
                   help="comparison group (default: row for wanda, layer otherwise)")
    p.add_argument("--tensors", default="blocks", help="comma list of blocks, embeddings, head (default blocks)")
    p.add_argument("--nm", default="2:4", help="n:m pattern: zero N of every M inputs (default 2:4)")
    p.add_argument("--score", choices=["magnitude", "wanda"], default="magnitude", help="n:m score")
    p.add_argument("--heads", type=float, default=0.0, help="structured: fraction of KV groups (heads) to remove")
    p.add_argument("--ffn", type=float, default=0.0, help="structured: fraction of FFN neurons to remove")
    p.add_argument("--importance", choices=["magnitude", "activation", "taylor"], default="magnitude")
    p.add_argument("--allocation", choices=["layer", "global"], default="layer")
    p.add_argument("--multiple-of", type=int, default=1,
                   help="structured: round each block's kept FFN width to a multiple (e.g. an int4 group size)")
    p.add_argument("--rounds", type=int, default=4, help="iterative: rounds of the cubic schedule")
    p.add_argument("--initial-sparsity", type=float, default=0.0)
    p.add_argument("--base", choices=["magnitude", "wanda", "structured"], default="magnitude",
                   help="iterative: the method each round applies")
    p.add_argument("--recovery-steps", type=int, default=200)
    p.add_argument("--recovery-loss", choices=["distill", "next-token"], default="distill",
                   help="recovery: KL to the dense model (default) or next-token loss on the calibration text")
    p.add_argument("--lr", type=float, default=3e-4, help="recovery learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="recovery window (tokens)")
    p.add_argument("--calib", default="stdlib", metavar="SOURCE",
                   help="calibration text: a .txt or .jsonl documents file, 'stdlib' (the demo corpus's "
                        "training documents from this Python's standard library, default) or 'random' token ids")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="held-out .txt / .jsonl for perplexity (default: heldout.jsonl beside SRC, if any)")
    p.add_argument("--eval-tokens", type=int, default=None, help="use only the first N held-out tokens")
    p.add_argument("--no-eval", action="store_true", help="skip held-out perplexity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--report", default=None, metavar="OUT.json", help="write the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace) -> Any:
    from pangu_fn.prune import PruneRecipe, parse_nm

    n, m = parse_nm(args.nm)
    granularity = args.granularity or ("row" if args.method == "wanda" else "layer")
    return PruneRecipe(
        method=args.method, sparsity=args.sparsity, granularity=granularity,
        tensors=tuple(t.strip() for t in args.tensors.split(",") if t.strip()), n=n, m=m, score=args.score,
        heads=args.heads, ffn=args.ffn, importance=args.importance, allocation=args.allocation,
        multiple_of=args.multiple_of,
        rounds=args.rounds, initial_sparsity=args.initial_sparsity, base=args.base,
        recovery_steps=args.recovery_steps, recovery_loss=args.recovery_loss, lr=args.lr,
        batch_size=args.batch_size, seq_len=args.seq_len, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, seed=args.seed)


def needs_calibration(recipe: Any) -> bool:
    r = recipe
    return (r.method == "wanda" or (r.method == "n:m" and r.score == "wanda")
            or (r.method == "structured" and r.importance != "magnitude" and not r.structured_explicit)
            or (r.method == "iterative" and (r.recovery_steps > 0 or r.base == "wanda"
                                             or (r.base == "structured" and r.importance != "magnitude"))))


def read_text_tokens(path: str | Path, tokenizer: Any) -> list[int]:
    """Token ids of a .jsonl documents file (eos after each document) or a plain text file."""
    from pangu_fn.data import read_documents, token_stream
    from pangu_fn.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"text file {path} does not exist")
    if path.suffix == ".jsonl":
        return token_stream(tokenizer, read_documents(path)).tolist()
    return tokenizer.encode(path.read_text(encoding="utf-8"))


def calibration_tokens(source: str, src: str, cfg: Any, tokenizer: Any, seed: int) -> Any:
    """1-D calibration token stream from `--calib`."""
    import torch

    from pangu_fn.errors import ConfigError

    if source == "random":
        return torch.randint(0, cfg.vocab_size, (65536,), generator=torch.Generator().manual_seed(seed))
    if tokenizer is None:
        raise ConfigError(f"--calib {source!r} needs a tokenizer beside {src!r}; pass --calib random for a preset")
    if source == "stdlib":
        from pangu_fn import data

        train_docs, _ = data.split(data.corpus())
        return data.token_stream(tokenizer, train_docs)
    return torch.tensor(read_text_tokens(source, tokenizer), dtype=torch.int64)


def default_eval_file(src: str) -> Path | None:
    for folder in (Path(src), Path(src).parent):
        if (folder / "heldout.jsonl").is_file():
            return folder / "heldout.jsonl"
    return None


def run(args: argparse.Namespace) -> int:
    import pangu_fn as pf
    from pangu_fn.io.destination import check_destination
    from pangu_fn.prune import prune
    from pangu_fn.tokenizer import find_tokenizer, load_tokenizer

    from .common import resolve_model, write_json

    recipe = recipe_from_args(args)  # a bad recipe fails before any loading
    check_destination(args.dst, overwrite=args.overwrite, sources=[args.src] if Path(args.src).exists() else [])
    params, cfg, random_weights = resolve_model(args.src, args.device, args.dtype, args.weights_seed)
    tok_file = find_tokenizer(args.src) if Path(args.src).is_dir() else None
    tokenizer = load_tokenizer(tok_file) if tok_file else None
    calib = calibration_tokens(args.calib, args.src, cfg, tokenizer, args.seed) if needs_calibration(recipe) else None
    eval_ids = None
    eval_file = args.eval_text or (None if args.no_eval else default_eval_file(args.src))
    if eval_file and not args.no_eval:
        if tokenizer is None:
            raise pf.ConfigError(f"--eval-text needs a tokenizer beside {args.src!r}")
        eval_ids = read_text_tokens(eval_file, tokenizer)[: args.eval_tokens]
    print(f"pangu prune: {recipe.summary()} on {args.src}{' (random weights)' if random_weights else ''}",
          file=sys.stderr)
    out, report = prune(params, recipe, calib, cfg=cfg, eval_ids=eval_ids, progress=not args.no_progress)
    extra = {tok_file.name: tok_file.read_bytes()} if tok_file else None
    pf.save(args.dst, out, cfg, extra_files=extra, overwrite=args.overwrite)
    print(report.format())
    if eval_file and eval_ids is not None:
        print(f"(perplexity on {len(eval_ids):,} tokens of {eval_file})")
    print(f"saved {args.dst}")
    if args.report:
        write_json({"src": args.src, "dst": args.dst, "eval_file": str(eval_file) if eval_ids else None,
                    **report.to_dict()}, args.report)
    return 0
