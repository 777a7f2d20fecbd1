"""`pangu generate`: sample continuations of one or more prompts."""

from __future__ import annotations

import argparse
import sys
import time

from . import tensor_parallel
from .common import TextStream, add_model_args, parse_prompt_ids, resolve_model, tokenizer_for, write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens from a model or preset")
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", help='token ids, e.g. "1 2 3"; separate prompts with ";"')
    src.add_argument("--prompt", help="prompt text (needs a tokenizer beside the model)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-eos", action="store_true", help="never stop at the end-of-sequence token")
    p.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    p.add_argument("--json", action="store_true", help="print one JSON object with the tokens")
    p.add_argument("--draft", default=None, metavar="PATH|self|lookup",
                   help="decode speculatively: a draft model folder, 'self' / 'self:N' (the target's first "
                        "N layers, default a quarter) or 'lookup' / 'lookup:N' (n-gram prompt lookup)")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per step (the most, with --adaptive)")
    p.add_argument("--draft-dtype", default=None, help="dtype of a draft model (default: --dtype, else as stored)")
    p.add_argument("--adaptive", action="store_true", help="choose each step's draft length from the recent "
                                                           "acceptance rate (falls back to plain decoding)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="decode through compiled programs (torch.compile; BACKEND inductor (default), "
                        "aot_eager or eager); see docs/design.md")
    tensor_parallel.add_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pangu_fn as pf

    if args.tp > 1 and not tensor_parallel.is_rank():
        return tensor_parallel.start(args)
    sampling = pf.SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    tokenizer = tokenizer_for(args.model) if args.prompt is not None else None
    prompts = [tokenizer.encode(args.prompt)] if tokenizer else parse_prompt_ids(args.prompt_ids)
    if args.tp > 1:
        params, cfg, _ = tensor_parallel.rank_model(args)
    else:
        params, cfg, _ = resolve_model(args.model, args.device, args.dtype, args.weights_seed)
    eos = () if args.no_eos else None
    compile_ = args.compile or False
    stats, events = None, pf.stream(params, cfg, prompts, args.max_new_tokens, sampling, args.seed, eos,
                                    compile=compile_)
    if args.draft:
        from pangu_fn.speculative import SpecStats, load_drafter, speculative_stream

        stats = SpecStats()
        events = speculative_stream(params, cfg, prompts, args.max_new_tokens, sampling, args.seed, eos,
                                    drafter=load_drafter(args.draft, params["tok_embed"]["weight"].device,
                                                         args.draft_dtype or args.dtype),
                                    k=args.k, adaptive=args.adaptive, stats=stats, compile=compile_)

    completions = [pf.Completion([], "length") for _ in prompts]
    text = TextStream(tokenizer) if tokenizer and len(prompts) == 1 else None
    start = time.perf_counter()
    for ev in events:
        completions[ev.row].tokens.append(ev.token)
        if ev.finish_reason:
            completions[ev.row].finish_reason = ev.finish_reason
        if args.stream and not args.json:
            if text is not None:
                print(text.push(ev.token), end="", flush=True)
            else:
                print(f"[{ev.row}] {ev.token}" if len(prompts) > 1 else ev.token, flush=True)
    elapsed = time.perf_counter() - start
    if args.stream and not args.json:
        print()
    if args.json:
        write_json({"model": args.model, "prompts": prompts,
                    "completions": [{"tokens": c.tokens, "finish_reason": c.finish_reason,
                                     **({"text": tokenizer.decode(c.tokens)} if tokenizer else {})}
                                    for c in completions],
                    "seconds": round(elapsed, 4),
                    **({"speculative": {"draft": args.draft, "k": args.k, "adaptive": args.adaptive,
                                        **stats.as_dict()}} if stats else {})}, None)
    elif not args.stream:
        for i, c in enumerate(completions):
            body = tokenizer.decode(c.tokens) if tokenizer else " ".join(map(str, c.tokens))
            print(f"{'[' + str(i) + '] ' if len(prompts) > 1 else ''}{body}")
    n = sum(len(c.tokens) for c in completions)
    if not tensor_parallel.is_lead():
        return 0
    print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tokens/s)", file=sys.stderr)
    if stats:
        print(f"speculative ({args.draft}, k {args.k}{', adaptive' if args.adaptive else ''}): {stats.summary()}",
              file=sys.stderr)
    return 0
