"""`pangu demo` (= `make demo`): the trained demo model writes text, then a one-table report.

The demo is the ordered list `stages()`. A stage is a small function `stage(ctx) -> list[Row]`
that shows its own progress and returns its report rows (name, parameters, size, held-out
perplexity, prefill ms, decode tokens/s, acceptance, parity, notes). A feature joins the demo
by appending one stage (the quantization, pruning, speculative and ONNX stages live in
`demo_stages.py`);
it finds the baseline model, tokenizer, prompt and held-out tokens in `ctx`, the rows so far
in `ctx.rows`, and may leave values for later stages in `ctx.extras`. `measure_speed` and
`heldout_perplexity` give every stage the same yardsticks.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parents[1] / "models" / "demo"
DEFAULT_PROMPT = "The with statement is used to"


@dataclass
class Row:
    """One line of the report; None prints as '-'."""

    stage: str
    params: int | None = None
    size_bytes: int | None = None
    perplexity: float | None = None
    prefill_ms: float | None = None
    tokens_per_s: float | None = None
    acceptance: float | None = None
    parity: str | None = None
    notes: str = ""


@dataclass
class Context:
    """What every stage gets: the demo target (fp32 compute) and where it is stored, its
    tokenizer, the prompt ids, the held-out token stream, the settings of the shown text
    (`sampling`, `seed`; speed is measured greedy by `measure_speed`), the rows produced so
    far and `extras`, a dict for values that later stages reuse."""

    model_dir: Path
    params: Any
    cfg: Any
    tokenizer: Any
    prompt_ids: list[int]
    heldout_ids: list[int]
    max_new_tokens: int
    sampling: Any
    seed: int
    repeats: int
    rows: list[Row] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the trained demo model")
    p.add_argument("--model-dir", default=str(DEMO_DIR), help="demo folder holding target/ and heldout.jsonl")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.3,
                   help="shown text only (default 1.3: a model this small repeats itself when greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per speed figure (median)")
    p.add_argument("--heldout-tokens", type=int, default=0, help="score only the first N held-out tokens (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the rows as JSON ('-' = stdout)")
    p.set_defaults(func=run)


# -- yardsticks shared by the stages -----------------------------------------------------------

def stored_bytes(folder: Path) -> int:
    """Bytes of the tensor files of a model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def heldout_perplexity(ctx: Context, params: Any, cfg: Any, desc: str) -> float:
    """Perplexity of a model on the committed held-out documents, with a progress bar."""
    from pangu_fn.evaluate import perplexity

    return perplexity(params, cfg, ctx.heldout_ids, progress=True, desc=desc)


def measure_speed(ctx: Context, engine: Any) -> tuple[float, float]:
    """(prefill ms, decode tokens/s): medians of `ctx.repeats` runs of a `pangu bench` engine
    on the demo prompt, after one warm-up run."""
    from .bench import measure

    m = measure(engine, ctx.prompt_ids, ctx.max_new_tokens, ctx.repeats, warmup=1)
    return m["prefill_ms"], m["decode_tok_s"]


# -- stages ------------------------------------------------------------------------------------

def pytorch_stage(ctx: Context) -> list[Row]:
    """Eager PyTorch: the demo target writes text, then its speed and held-out perplexity.

    Streams a continuation of the prompt, times prefill and decode with `measure_speed` and
    scores the held-out documents."""
    import pangu_fn as pf

    from .bench import pangu_engine
    from .common import TextStream

    text = TextStream(ctx.tokenizer)
    print(f"\n{ctx.tokenizer.decode(ctx.prompt_ids)}", end="", flush=True)
    finish = "length"
    for ev in pf.stream(ctx.params, ctx.cfg, [ctx.prompt_ids], ctx.max_new_tokens, ctx.sampling, ctx.seed):
        print(text.push(ev.token), end="", flush=True)
        finish = ev.finish_reason or finish
    print(f"\n[{len(text.tokens)} tokens, stopped at {'end of document' if finish == 'eos' else 'the token limit'}]\n")
    prefill_ms, tok_s = measure_speed(ctx, pangu_engine(ctx.params, ctx.cfg))
    ppl = heldout_perplexity(ctx, ctx.params, ctx.cfg, "pytorch held-out perplexity")
    stored = stored_bytes(ctx.model_dir / "target")
    return [Row("pytorch (eager)", pf.count_params(ctx.params), pf.nbytes(ctx.params), ppl, prefill_ms, tok_s,
                parity="reference", notes=f"fp32 compute; stored as bf16 ({stored / 1e6:.1f} MB)")]


def stages() -> list[Callable[[Context], list[Row]]]:
    """The demo's stages in order."""
    from .demo_stages import export_stage, prune_stage, quantize_stage, speculative_stage

    return [pytorch_stage, quantize_stage, prune_stage, speculative_stage, export_stage]


# -- the command -------------------------------------------------------------------------------

def load_context(args: argparse.Namespace) -> Context:
    """The demo target, tokenizer, prompt and held-out tokens. Raises ConfigError when the
    demo folder is missing (with how to make it) and InputError for an empty prompt."""
    import pangu_fn as pf
    from pangu_fn import data
    from pangu_fn.errors import ConfigError, InputError
    from pangu_fn.tokenizer import load_tokenizer

    model_dir = Path(args.model_dir)
    if not (model_dir / "target" / "config.json").is_file() or not (model_dir / "heldout.jsonl").is_file():
        raise ConfigError(f"{model_dir}: expected the demo models (target/config.json, heldout.jsonl); "
                          "train them with `pangu train-demo --out DIR`")
    params, cfg = pf.load(model_dir / "target", dtype="fp32")
    tokenizer = load_tokenizer(model_dir / "target")
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise InputError("demo: expected a non-empty --prompt")
    heldout_ids = data.token_stream(tokenizer, data.read_documents(model_dir / "heldout.jsonl")).tolist()
    if args.heldout_tokens > 0:
        heldout_ids = heldout_ids[:args.heldout_tokens]
    sampling = pf.SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                 repetition_penalty=args.repetition_penalty)
    return Context(model_dir, params, cfg, tokenizer, prompt_ids, heldout_ids, args.max_new_tokens, sampling,
                   args.seed, args.repeats)


def format_report(rows: list[Row]) -> str:
    """The rows as an aligned text table."""
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = ["stage", "params", "weights MB", "held-out ppl", "prefill ms", "decode tok/s", "acceptance", "parity", "notes"]
    body = [[r.stage, cell(r.params and r.params / 1e6, ".2f") + ("M" if r.params else ""),
             cell(r.size_bytes and r.size_bytes / 1e6, ".2f"), cell(r.perplexity, ".2f"), cell(r.prefill_ms, ".1f"),
             cell(r.tokens_per_s, ".0f"), cell(r.acceptance, ".1%"), r.parity or "-", r.notes] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def run(args: argparse.Namespace) -> int:
    import torch

    from .common import write_json

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ctx = load_context(args)
    todo = stages()
    print(f"pangu demo: {ctx.model_dir / 'target'} ({ctx.cfg.family} family, {ctx.cfg.num_layers} layers, "
          f"vocab {ctx.cfg.vocab_size}); {len(ctx.heldout_ids):,} held-out tokens; {len(todo)} stages")
    for i, stage in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] {stage.__name__}: {(stage.__doc__ or '').split(chr(10))[0]}", flush=True)
        ctx.rows.extend(stage(ctx))
    print(f"\n{format_report(ctx.rows)}\n\n{time.perf_counter() - start:.0f} s in all")
    if args.json_out:
        write_json([asdict(r) for r in ctx.rows], args.json_out)
    return 0
