"""`pangu-run BUNDLE --prompt TEXT | --prompt-ids IDS` (and `pangu run`, which is this command):
generate with an exported bundle through numpy + onnxruntime, without torch or pangu_fn."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from .errors import GenerationError, PanguRuntimeError
from .lookup import PromptLookup
from .sampling import SamplingParams
from .session import Session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, on `p` (the `pangu-run` parser or `pangu`'s `run` subparser)."""
    p.add_argument("bundle", help="bundle folder written by `pangu export`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-ids", help="token ids, e.g. '1 2 3'; ';' separates prompts of a batch")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eos", action="store_true", help="never stop early at an eos token")
    p.add_argument("--lookup", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding with up to K draft tokens per step")
    p.add_argument("--provider", default="cpu", help="cpu | cuda | cann | auto (default cpu)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="write results as JSON ('-' = stdout)")


def main(argv: list[str] | None = None) -> int:
    """The `pangu-run` console script. Bad input prints one line and exits 2."""
    parser = argparse.ArgumentParser(prog="pangu-run", description="Generate with an exported pangu-fn bundle "
                                     "(ONNX Runtime, no torch).")
    add_arguments(parser)
    return run(parser.parse_args(argv), prog="pangu-run")


def run(args: argparse.Namespace, prog: str = "pangu run") -> int:
    """Run the command; a PanguRuntimeError prints `{prog}: error: ...` and returns 2."""
    try:
        return _run(args)
    except PanguRuntimeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def providers_for(name: str) -> list[str]:
    """ONNX Runtime providers for --provider; `auto` takes CANN, then CUDA, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if name == "auto":
        return [p for p in (PROVIDERS["cann"], PROVIDERS["cuda"]) if p in available] + [PROVIDERS["cpu"]]
    if name not in PROVIDERS:
        raise GenerationError(f"--provider: expected one of {sorted(PROVIDERS)} or auto, found {name!r}")
    if PROVIDERS[name] not in available:
        raise GenerationError(f"--provider {name}: {PROVIDERS[name]} is not in this onnxruntime build "
                              f"(available: {available})")
    return [PROVIDERS[name]] + ([PROVIDERS["cpu"]] if name != "cpu" else [])


def parse_ids(text: str) -> list[list[int]]:
    """'1 2 3; 4 5' -> [[1, 2, 3], [4, 5]]. Raises GenerationError for a non-integer."""
    prompts = []
    for part in text.replace("|", ";").split(";"):
        try:
            prompts.append([int(t) for t in part.replace(",", " ").split()])
        except ValueError:
            raise GenerationError(f"--prompt-ids: expected integers separated by spaces, found {part.strip()!r}") from None
    return prompts


def _run(args: argparse.Namespace) -> int:
    session = Session(args.bundle, providers=providers_for(args.provider), threads=args.threads)
    text = args.prompt is not None
    prompts = [session.tokenizer.encode(t, add_bos=True) for t in args.prompt] if text else parse_ids(args.prompt_ids)
    n = args.max_new_tokens or int(session.generation.get("max_new_tokens", 128))
    n = min(n, session.max_seq_len - max(len(p) for p in prompts))
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    lookup = PromptLookup(num_draft=args.lookup) if args.lookup else None
    eos = () if args.no_eos else None
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    live = text and len(prompts) == 1 and args.json_out != "-"
    shown = ""
    start = time.perf_counter()
    for ev in session.stream(prompts, n, sampling, args.seed, eos, lookup):
        tokens[ev.row].append(ev.token)
        reasons[ev.row] = ev.finish_reason or reasons[ev.row]
        if live:  # print the text as it grows
            now = session.tokenizer.decode(tokens[0])
            print(now[len(shown):] if now.startswith(shown) else "\n" + now, end="", flush=True)
            shown = now
    elapsed = time.perf_counter() - start
    results = [{"prompt_tokens": len(p), "tokens": t, "finish_reason": r,
                **({"text": session.tokenizer.decode(t)} if text else {})}
               for p, t, r in zip(prompts, tokens, reasons)]
    if live:
        print()
    elif args.json_out != "-":
        for res in results:
            print(res["text"] if text else " ".join(map(str, res["tokens"])))
    made = sum(len(t) for t in tokens)
    print(f"{made} tokens in {elapsed:.2f} s ({made / elapsed:.1f} tok/s, prefill included)", file=sys.stderr)
    if args.json_out:
        out = {"bundle": args.bundle, "target": session.manifest["target"], "results": results,
               "seconds": round(elapsed, 4), **({"lookup": session.lookup_stats} if lookup else {})}
        text_out = json.dumps(out, indent=2)
        if args.json_out == "-":
            print(text_out)
        else:
            write_atomic(args.json_out, text_out + "\n")
    return 0


def write_atomic(path: str, text: str) -> None:
    """Write-then-rename, so an interrupted run leaves no half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".pangu-run.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
