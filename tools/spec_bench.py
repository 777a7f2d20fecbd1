"""`pangu bench --draft ...`: plain greedy decoding of the target against speculative decoding
with each requested drafter, in the same run, on the same prompts, with acceptance rates and
ratios against the plain row.

Prompts (`--spec-prompts`): `held-out` takes the first `--prompt-len` tokens of held-out
documents (`heldout.jsonl` beside the model folder or its parent, as `pangu train-demo` writes
it); `quote` takes a passage of such a document (`--new-tokens` + 8 tokens, or fewer to fit the
context) followed by a blank line and the passage's first 8 tokens again, so that a faithful continuation repeats it (the case prompt lookup is
for: summaries, code edits); `random` uses random token ids (no tokenizer needed). Greedy
speculative output equals plain greedy output, so each row decodes the same tokens (in fp32;
in bf16 a prompt may part from plain greedy at a near-tie, see docs/speculative.md).

Fixed-K prompt lookup rows also get `lookup_replay` figures: the tokens per call replayed from
their own tokens (equal to the measured figure) and the best any choice among lookup's n-gram
matches would reach on them, an upper bound for every lookup rule on this model.

An adaptive row (`--adaptive`) starts each call from the controller the row's previous call
left (`SpecStats.adaptive`, a warm start, as a server decoding request after request would);
the warm-up round's first call starts cold.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

QUOTE_HEAD = 8  # tokens of the passage repeated at the end of a quote prompt


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", action="append", default=[], metavar="PATH|self|lookup",
                   help="also decode speculatively with this drafter (repeatable): a draft model folder, "
                        "'self' / 'self:N' or 'lookup' / 'lookup:N'; adds a plain greedy row on the same prompts")
    p.add_argument("--k", type=int, default=4, help="speculative rows: tokens drafted per step")
    p.add_argument("--adaptive", action="store_true",
                   help="speculative rows: also measure each drafter with adaptive K (at most --k), each call "
                        "starting from the controller the previous call left")
    p.add_argument("--spec-prompts", default="held-out", choices=["held-out", "quote", "random"],
                   help="speculative rows: prompts from held-out documents, quoting prompts, or random ids")
    p.add_argument("--prompt-count", type=int, default=4, help="speculative rows: prompts per row")
    p.add_argument("--draft-dtype", default=None, help="speculative rows: dtype of draft models (default: the target's)")


def bench_prompts(model: str, cfg: Any, kind: str, prompt_len: int, new_tokens: int, count: int) -> list[list[int]]:
    """`count` prompts of the kind described in the module docstring. Raises ConfigError when
    `held-out` / `quote` prompts are asked for a model without a tokenizer or held-out documents."""
    import torch

    from pangu_fn.errors import ConfigError

    if kind == "random":
        gen = torch.Generator().manual_seed(1234)
        return [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(count)]
    from pangu_fn.data import read_documents

    from .common import tokenizer_for

    folder = Path(model)
    docs_file = next((f for f in (folder / "heldout.jsonl", folder.parent / "heldout.jsonl") if f.is_file()), None)
    if docs_file is None:
        raise ConfigError(f"--spec-prompts {kind}: expected heldout.jsonl in {model!r} or its parent folder "
                          "(pangu train-demo writes it); use --spec-prompts random for other models")
    tokenizer = tokenizer_for(model)
    separator = tokenizer.encode("\n\n")
    passage = prompt_len if kind == "held-out" else min(new_tokens + QUOTE_HEAD,
                                                        cfg.max_seq_len - new_tokens - len(separator) - QUOTE_HEAD)
    prompts = []
    for doc in read_documents(docs_file):
        ids = tokenizer.encode(doc.text)
        if len(ids) < passage + new_tokens:
            continue
        if kind == "held-out":
            prompts.append(ids[:prompt_len])
        else:
            prompts.append(ids[:passage] + separator + ids[:QUOTE_HEAD])
        if len(prompts) == count:
            return prompts
    raise ConfigError(f"--spec-prompts {kind}: {docs_file} has {len(prompts)} documents of at least "
                      f"{passage + new_tokens} tokens; expected --prompt-count {count}")


def spec_engine(params: Any, cfg: Any, drafter: Any, k: int, adaptive: bool, stats: Any) -> Callable:
    from pangu_fn.speculative import speculative_stream

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        warm = stats.adaptive if adaptive and stats.adaptive is not None else adaptive  # the last call's controller
        stamps = [time.perf_counter() for _ in speculative_stream(params, cfg, [prompt], n, eos_token_ids=(),
                                                                  drafter=drafter, k=k, adaptive=warm, stats=stats)]
        return start, stamps

    return run


def spec_rows(params: Any, cfg: Any, args: argparse.Namespace, measure: Callable[..., dict[str, Any]],
              engine: Callable[..., Any]) -> list[dict[str, Any]]:
    """A plain greedy row and one row per drafter (and adaptive variant) over the same prompts,
    taking turns prompt by prompt: decode tokens/s (all prompts' tokens over all prompts' decode time, each
    prompt's rate the median of the repeats), acceptance rate, tokens per target call (over
    all runs, warm-up included), and `vs_plain`."""
    if not args.draft:
        return []
    from pangu_fn.cache import compute_dtype
    from pangu_fn.speculative import SpecStats, load_drafter

    prompts = bench_prompts(args.model, cfg, args.spec_prompts, args.prompt_len, args.new_tokens, args.prompt_count)
    device, dtype = params["tok_embed"]["weight"].device, compute_dtype(params)
    candidates: list[tuple[str, Any, SpecStats | None, dict[str, Any]]] = [("plain greedy", engine(params, cfg), None, {})]
    for spec in args.draft:
        drafter = load_drafter(spec, device, args.draft_dtype or dtype)
        for adaptive in (False, True) if args.adaptive else (False,):
            stats = SpecStats()
            label = f"speculative {spec} k{'<=' if adaptive else '='}{args.k}"
            info = {"draft": spec, "k": args.k, "adaptive": adaptive, **({"warm_start": True} if adaptive else {})}
            candidates.append((label, spec_engine(params, cfg, drafter, args.k, adaptive, stats), stats, info))
    # every row decodes each prompt in turn (a fraction of a second each), who goes first
    # rotating, so that the machine's slow spells, which last seconds, hit every row alike
    runs: dict[str, list[list[dict[str, Any]]]] = {label: [[] for _ in prompts] for label, *_ in candidates}
    total = (args.warmup + args.repeats) * len(candidates) * len(prompts)
    with tqdm(total=total, desc=f"bench: speculative rows ({args.spec_prompts} prompts)", file=sys.stderr) as bar:
        for repeat in range(args.warmup + args.repeats):
            for i, prompt in enumerate(prompts):
                first = (repeat * len(prompts) + i) % len(candidates)
                for label, run, _, _ in candidates[first:] + candidates[:first]:
                    result = measure(run, prompt, args.new_tokens, 1, 0)
                    if repeat >= args.warmup:
                        runs[label][i].append(result)
                    bar.update()
    rows = []
    for label, _, stats, info in candidates:
        rates = [statistics.median(r["decode_tok_s"] for r in per) for per in runs[label]]
        prefill = [statistics.median(r["prefill_ms"] for r in per) for per in runs[label]]
        decode_s = sum((args.new_tokens - 1) / rate for rate in rates)
        row = {"engine": f"{label} [{args.spec_prompts}]", "dtype": str(dtype).replace("torch.", ""),
               "prefill_ms": round(statistics.mean(prefill), 2),
               "decode_tok_s": round(len(prompts) * (args.new_tokens - 1) / decode_s, 2),
               "per_prompt_decode_tok_s": [round(rate, 2) for rate in rates], **info}
        row["ms_per_token"] = round(1e3 / row["decode_tok_s"], 3)
        if stats is not None:
            row.update({key: value for key, value in stats.as_dict().items() if key != "prefill_s"})
        rows.append(row)
    add_lookup_bounds(params, cfg, prompts, args.new_tokens, rows)
    for row in rows:
        row["vs_plain"] = round(row["decode_tok_s"] / rows[0]["decode_tok_s"], 3)
        extra = f"   accept {row['acceptance_rate']:.1%}  {row['tokens_per_call']:.2f} tok/call" if "steps" in row else ""
        if "lookup_best_match_tokens_per_call" in row:
            extra += f" (best n-gram match every step: {row['lookup_best_match_tokens_per_call']:.2f})"
        print(f"{row['engine']:>44}  decode {row['decode_tok_s']:8.2f} tok/s   x{row['vs_plain']:.3f} vs plain{extra}",
              file=sys.stderr)
    return rows


def add_lookup_bounds(params: Any, cfg: Any, prompts: list[list[int]], new_tokens: int,
                      rows: list[dict[str, Any]]) -> None:
    """Fixed-K prompt lookup rows get the tokens per target call replayed from the row's greedy
    tokens (`lookup_replay`: it equals the measured figure), the most that the best of all
    lookup's n-gram matches at every step would give on those tokens (no lookup rule can beat
    it), and how many prompts' tokens equal plain greedy decoding's (all in fp32; in bf16 a
    prompt may part at a near-tie, see docs/speculative.md)."""
    from pangu_fn import generate
    from pangu_fn.speculative import load_drafter, lookup_replay, speculative_generate

    lookup_rows = [row for row in rows if row.get("draft", "").partition(":")[0] == "lookup" and not row["adaptive"]]
    plain = [generate(params, cfg, [p], new_tokens, eos_token_ids=())[0].tokens for p in prompts] if lookup_rows else []
    for row in lookup_rows:
        rule = load_drafter(row["draft"])  # a PromptLookup
        own = [speculative_generate(params, cfg, [p], new_tokens, eos_token_ids=(), drafter=rule, k=row["k"])[0].tokens
               for p in prompts]
        row["prompts_equal_to_plain"] = sum(a == b for a, b in zip(plain, own))
        for key, best in (("lookup_replay_tokens_per_call", False), ("lookup_best_match_tokens_per_call", True)):
            replays = [lookup_replay(p, g, row["k"], rule.max_ngram, rule.min_ngram, best) for p, g in zip(prompts, own)]
            row[key] = round(sum(kept for _, kept in replays) / sum(calls for calls, _ in replays), 4)
