"""`pangu train-demo`: train the committed demo models from a fixed seed, on the CPU.

Builds the corpus (`pangu_fn.data`: pydoc topics + standard-library docstrings, split by
document), trains a SentencePiece tokenizer on the training documents, trains a **target**
model of the openPangu-Embedded family (RMSNorm, SwiGLU, RoPE, GQA, q/k/v/o bias) with
next-token loss, then a shallow **draft** model for speculative decoding: it starts from the
target's embedding, first block(s) and final norm and is distilled from the target's logits
(KL + next-token loss). Both are saved in bf16 beside the tokenizer, with the held-out
documents, `metrics.json` and a model card `README.md` holding every figure and file hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

REFERENCE_PROMPT = "A context manager is an object that"
REFERENCE_TOKENS = 32
SHARD_SIZE = 6 * 2**20  # committed files stay under 8 MB each


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-demo", help="train the demo tokenizer, target and draft models")
    p.add_argument("--out", default="models/demo", help="output folder (replaced atomically at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--pydoc-only", action="store_true", help="skip the standard-library docstrings")
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=8, help="target layers")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--context", type=int, default=256, help="max_seq_len of both models")
    p.add_argument("--seq-len", type=int, default=256, help="training window (tokens), at most --context")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=600, help="target training steps")
    p.add_argument("--draft-steps", type=int, default=300, help="draft distillation steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--kl-weight", type=float, default=0.8, help="draft loss: KL share (rest: next-token)")
    p.add_argument("--eval-every", type=int, default=150, help="held-out loss every N steps (0: never)")
    p.add_argument("--on-policy", type=float, default=0.0, metavar="FRACTION",
                   help="draft: share of training windows that are the target's own greedy continuations of "
                        "prompts from the training documents (on-policy distillation)")
    p.add_argument("--on-policy-windows", type=int, default=1024,
                   help="draft: how many such continuations to generate (with --on-policy)")
    p.add_argument("--draft-only", action="store_true",
                   help="keep the target, tokenizer and held-out split already in --out; distil a new draft "
                        "(--draft-layers, --draft-steps, --kl-weight, --lr, --seed, --on-policy) and update "
                        "metrics.json and the card")
    p.add_argument("--from-draft", action="store_true",
                   help="with --draft-only: start from the draft in --out (fine-tune it, keeping its layer count) "
                        "instead of the target's first block(s)")
    p.set_defaults(func=run)


def demo_config(tokenizer: Any, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int,
                context: int) -> Any:
    """An openPangu-Embedded-family config sized for the demo, with the tokenizer's ids."""
    from pangu_fn.config import ModelConfig

    return ModelConfig(
        family="openpangu", vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, intermediate_size=ffn,
        max_seq_len=context, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", activation="silu",
        positions="rope", rope_theta=10000.0, tie_embeddings=True, attn_bias=True, mlp_bias=False,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def draft_init(target: Any, draft_cfg: Any, seed: int) -> Any:
    """Draft params that start from the target's embedding, first blocks and final norm."""
    import torch.utils._pytree as pytree

    import pangu_fn as pf

    params = pf.init_params(draft_cfg, seed=seed + 1)
    params["tok_embed"] = {k: v.clone() for k, v in target["tok_embed"].items()}
    params["final_norm"] = {k: v.clone() for k, v in target["final_norm"].items()}
    params["blocks"] = [pytree.tree_map(lambda t: t.clone(), b) for b in target["blocks"][:draft_cfg.num_layers]]
    return params


def heldout_monitor(cfg: Any, name: str, ids: list[int], eval_len: int, every: int) -> Any:
    """An `after_step` hook that logs the held-out loss on `ids` every `every` steps (0: never)."""
    from pangu_fn.evaluate import perplexity

    step = [0]

    def after_step(params: Any) -> None:
        step[0] += 1
        if every and step[0] % every == 0:
            loss = math.log(perplexity(params, cfg, ids, eval_len))
            tqdm.write(f"{name} step {step[0]}: held-out loss {loss:.3f}", file=sys.stderr)
    return after_step


def distil_draft(target: Any, tcfg: Any, dcfg: Any, train_ids: Any, args: argparse.Namespace,
                 after_step: Any, start: Any = None) -> tuple[Any, list[float]]:
    """The draft (fp32 params) distilled from `target` on random windows of `train_ids` (a share
    `args.on_policy` of them the target's own continuations), and its losses. It starts from
    `start` (a draft to fine-tune) or else from the target's first block(s)."""
    import torch

    import pangu_fn as pf
    from pangu_fn.train import (
        TrainConfig,
        continuation_windows,
        distillation_loss,
        mixed_batches,
        random_batches,
        train,
    )

    draft = start if start is not None else draft_init(target, dcfg, args.seed)
    batches = random_batches(train_ids, args.batch, args.seq_len, args.seed + 1)
    if args.on_policy > 0:
        width = min(args.seq_len + 1, tcfg.max_seq_len)
        # generated with the committed bf16 weights: the tokens the benchmarks' target produces
        windows = continuation_windows(pf.astype(target, torch.bfloat16), tcfg, train_ids, args.on_policy_windows,
                                       width, (8, min(64, width // 4)), args.seed + 2)
        batches = mixed_batches(batches, windows, args.on_policy, args.seed + 3)
    dc = TrainConfig(steps=args.draft_steps, lr=args.lr, warmup=min(50, max(1, args.draft_steps // 10)))
    return train(draft, dcfg, batches, dc, loss_fn=distillation_loss(target, tcfg, dcfg, args.kl_weight),
                 after_step=after_step, desc="draft")


def draft_figures(target: Any, tcfg: Any, draft: Any, dcfg: Any, losses: list[float], args: argparse.Namespace,
                  train_sample: list[int], held_ids: list[int], eval_len: int, seconds: float) -> dict[str, Any]:
    """The draft's entry of `metrics.json`: size, training, perplexities, greedy agreement."""
    from pangu_fn import count_params
    from pangu_fn.evaluate import greedy_agreement, perplexity

    return {"parameters": count_params(draft), "layers": dcfg.num_layers, "steps": args.draft_steps,
            "tokens_seen": args.draft_steps * args.batch * args.seq_len,
            "final_train_loss_50": sum(losses[-50:]) / len(losses[-50:]),
            "train_ppl": perplexity(draft, dcfg, train_sample, eval_len, progress=True, desc="draft train ppl"),
            "heldout_ppl": perplexity(draft, dcfg, held_ids, eval_len, progress=True, desc="draft held-out ppl"),
            "greedy_agreement_heldout": greedy_agreement(target, tcfg, draft, dcfg, held_ids, eval_len),
            "greedy_agreement_continuations": continuation_agreement(target, tcfg, draft, dcfg, held_ids),
            "seconds": round(seconds, 1)}


CONTINUATION_PROMPT, CONTINUATION_TOKENS, CONTINUATIONS = 32, 64, 64


def continuation_agreement(target: Any, tcfg: Any, draft: Any, dcfg: Any, held_ids: list[int]) -> float:
    """How often the draft's greedy next token equals the target's along the target's own greedy
    continuations (`CONTINUATION_TOKENS` tokens, generated with the bf16 weights) of
    `CONTINUATIONS` held-out prompts of `CONTINUATION_PROMPT` tokens: the text speculative
    decoding drafts, so this is what its acceptance follows."""
    import torch

    import pangu_fn as pf
    from pangu_fn.train import continuation_windows

    p, n = CONTINUATION_PROMPT, CONTINUATION_TOKENS
    windows = continuation_windows(pf.astype(target, torch.bfloat16), tcfg, torch.tensor(held_ids), CONTINUATIONS,
                                   p + n, (p, p))
    with torch.inference_mode():
        want = pf.forward(target, tcfg, windows[:, :-1])[0][:, p - 1:].argmax(-1)
        got = pf.forward(draft, dcfg, windows[:, :-1])[0][:, p - 1:].argmax(-1)
    return (want == got).float().mean().item()


def spaced_sample(ids: list[int], n_tokens: int, seq_len: int) -> list[int]:
    """About `n_tokens` tokens of `ids` as evenly spaced runs of `seq_len` tokens."""
    runs = max(1, min(n_tokens // seq_len, len(ids) // seq_len))
    stride = len(ids) // runs
    return [t for r in range(runs) for t in ids[r * stride:r * stride + seq_len]]


def reference_generation(params: Any, cfg: Any, tokenizer: Any, prompt: str, n: int) -> dict[str, Any]:
    """Greedy continuation of `prompt` (no early stop) and the smallest top-1 / top-2 logit gap
    along it, recomputed without a cache: how safe the tokens are from rounding flips."""
    import torch

    import pangu_fn as pf

    ids = tokenizer.encode(prompt)
    tokens = pf.generate(params, cfg, [ids], n, eos_token_ids=())[0].tokens
    with torch.inference_mode():
        logits = pf.forward(params, cfg, torch.tensor([ids + tokens[:-1]]))[0][0, len(ids) - 1:]
    top2 = logits.float().topk(2, -1).values
    return {"prompt": prompt, "prompt_ids": ids, "max_new_tokens": n, "tokens": tokens,
            "text": tokenizer.decode(tokens), "min_top2_gap": round(float((top2[:, 0] - top2[:, 1]).min()), 4)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(args: argparse.Namespace) -> int:
    import torch

    import pangu_fn as pf
    from pangu_fn import data
    from pangu_fn.evaluate import perplexity
    from pangu_fn.io.atomic import atomic_dir
    from pangu_fn.tokenizer import load_tokenizer
    from pangu_fn.train import TrainConfig, random_batches, train

    if not 2 <= args.seq_len <= args.context:
        raise pf.InputError(f"train-demo: expected 2 <= --seq-len <= --context ({args.context}), found {args.seq_len}")
    if not 0.0 <= args.on_policy <= 1.0:
        raise pf.InputError(f"train-demo: expected 0 <= --on-policy <= 1, found {args.on_policy}")
    if args.from_draft and not args.draft_only:
        raise pf.InputError("train-demo: --from-draft fine-tunes the draft of a --draft-only run; add --draft-only")
    if args.draft_only:
        return run_draft_only(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    clock = {"start": time.perf_counter()}
    log = lambda msg: tqdm.write(msg, file=sys.stderr)

    # 1. corpus and tokenizer
    docs = data.corpus(docstrings=not args.pydoc_only)
    train_docs, held_docs = data.split(docs, args.heldout_fraction)
    if not train_docs or not held_docs:
        raise pf.InputError(f"train-demo: --heldout-fraction {args.heldout_fraction} leaves "
                            f"{len(train_docs)} train and {len(held_docs)} held-out documents; expected both > 0")
    sp_bytes = data.train_tokenizer(train_docs, args.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(sp_bytes)
        tok = load_tokenizer(Path(tmp) / "tokenizer.model")
        train_ids = data.token_stream(tok, train_docs)
        held_ids = data.token_stream(tok, held_docs).tolist()
    clock["tokenizer"] = time.perf_counter()
    log(f"corpus (Python {data.python_version()}): {len(train_docs)} train documents, {train_ids.numel():,} tokens; "
        f"{len(held_docs)} held-out documents, {len(held_ids):,} tokens; tokenizer vocab {tok.vocab_size}")
    if train_ids.numel() < args.seq_len + 2:
        raise pf.InputError(f"train-demo: {train_ids.numel()} training tokens; expected at least {args.seq_len + 2}")

    eval_len = min(256, args.context - 1)  # perplexity()'s default window for these models
    monitor_ids = held_ids[: 32 * eval_len]

    def monitor(cfg: Any, name: str) -> Any:
        return heldout_monitor(cfg, name, monitor_ids, eval_len, args.eval_every)

    # 2. target
    tcfg = demo_config(tok, args.layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.context)
    target = pf.init_params(tcfg, seed=args.seed)
    tc = TrainConfig(steps=args.steps, lr=args.lr, warmup=min(50, max(1, args.steps // 10)))
    target, target_losses = train(target, tcfg, random_batches(train_ids, args.batch, args.seq_len, args.seed), tc,
                                  after_step=monitor(tcfg, "target"), desc="target")
    target = pf.astype(pf.astype(target, torch.bfloat16), torch.float32)  # the committed weights
    clock["target"] = time.perf_counter()

    # 3. draft, distilled from the committed target
    dcfg = demo_config(tok, args.draft_layers, args.hidden, args.heads, args.kv_heads, args.ffn, args.context)
    draft, draft_losses = distil_draft(target, tcfg, dcfg, train_ids, args, monitor(dcfg, "draft"))
    clock["draft"] = time.perf_counter()

    # 4. save, reload what was saved, measure it, write the card
    out = Path(args.out)
    with atomic_dir(out) as tmp:
        pf.save(tmp / "target", pf.astype(target, torch.bfloat16), tcfg, shard_size=SHARD_SIZE,
                extra_files={"tokenizer.model": sp_bytes})
        pf.save(tmp / "draft", pf.astype(draft, torch.bfloat16), dcfg, shard_size=SHARD_SIZE,
                extra_files={"tokenizer.model": sp_bytes})
        data.write_documents(tmp / "heldout.jsonl", held_docs)
        target, tcfg = pf.load(tmp / "target", dtype="fp32")
        draft, dcfg = pf.load(tmp / "draft", dtype="fp32")
        tok = load_tokenizer(tmp / "target")
        held_ids = data.token_stream(tok, data.read_documents(tmp / "heldout.jsonl")).tolist()
        train_sample = spaced_sample(train_ids.tolist(), len(held_ids), eval_len)
        ppl = {"target": {"train": perplexity(target, tcfg, train_sample, eval_len, progress=True,
                                              desc="target train ppl"),
                          "heldout": perplexity(target, tcfg, held_ids, eval_len, progress=True,
                                                desc="target held-out ppl")}}
        draft_metrics = draft_figures(target, tcfg, draft, dcfg, draft_losses, args, train_sample, held_ids,
                                      eval_len, clock["draft"] - clock["target"])
        reference = reference_generation(target, tcfg, tok, REFERENCE_PROMPT, REFERENCE_TOKENS)
        clock["end"] = time.perf_counter()
        metrics = {
            "python": data.python_version(), "torch": torch.__version__, "seed": args.seed,
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "corpus": {"train_documents": len(train_docs), "heldout_documents": len(held_docs),
                       "pydoc_documents": sum(d.name.startswith("pydoc:") for d in docs),
                       "docstring_documents": sum(d.name.startswith("stdlib:") for d in docs),
                       "train_chars": sum(len(d.text) for d in train_docs),
                       "heldout_chars": sum(len(d.text) for d in held_docs),
                       "train_tokens": train_ids.numel(), "heldout_tokens": len(held_ids),
                       "train_sample_tokens": len(train_sample)},
            "tokenizer": {"type": "sentencepiece bpe, byte fallback", "vocab_size": tok.vocab_size,
                          "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id},
            "eval_seq_len": eval_len,
            "target": {"parameters": pf.count_params(target), "layers": tcfg.num_layers, "steps": args.steps,
                       "tokens_seen": args.steps * args.batch * args.seq_len,
                       "final_train_loss_50": sum(target_losses[-50:]) / len(target_losses[-50:]),
                       "train_ppl": ppl["target"]["train"], "heldout_ppl": ppl["target"]["heldout"],
                       "seconds": round(clock["target"] - clock["tokenizer"], 1)},
            "draft": draft_metrics,
            "reference": reference,
            "seconds": {"tokenizer_and_corpus": round(clock["tokenizer"] - clock["start"], 1),
                        "total": round(clock["end"] - clock["start"], 1)},
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_card(tmp)
    log(f"target: held-out ppl {ppl['target']['heldout']:.2f} (train {ppl['target']['train']:.2f}); "
        f"draft: held-out ppl {draft_metrics['heldout_ppl']:.2f} (train {draft_metrics['train_ppl']:.2f}), "
        f"greedy agreement with target {draft_metrics['greedy_agreement_heldout']:.1%}; "
        f"{clock['end'] - clock['start']:.0f} s in all")
    print(out)
    return 0


DRAFT_ARGS = ("draft_layers", "draft_steps", "kl_weight", "lr", "seed", "batch", "seq_len", "threads", "on_policy",
              "on_policy_windows", "from_draft")


def run_draft_only(args: argparse.Namespace) -> int:
    """`--draft-only`: distil a new draft from the target in `--out` on the same training
    documents (the corpus rebuilt and split as recorded, checked against `heldout.jsonl`), then
    replace `draft/` and update the draft's figures in `metrics.json` and the card."""
    import torch

    import pangu_fn as pf
    from pangu_fn import data
    from pangu_fn.io.atomic import atomic_dir, atomic_file
    from pangu_fn.tokenizer import load_tokenizer

    out = Path(args.out)
    if not (out / "metrics.json").is_file() or not (out / "target").is_dir():
        raise pf.InputError(f"train-demo --draft-only: expected a demo folder with target/ and metrics.json, "
                            f"found none at {out}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    metrics = json.loads((out / "metrics.json").read_text())
    recorded = metrics["args"]
    target, tcfg = pf.load(out / "target", dtype="fp32")
    tok = load_tokenizer(out / "target")
    train_docs, held_docs = data.split(data.corpus(docstrings=not recorded["pydoc_only"]), recorded["heldout_fraction"])
    committed = data.read_documents(out / "heldout.jsonl")
    if [d.name for d in held_docs] != [d.name for d in committed]:
        raise pf.InputError(f"train-demo --draft-only: this Python ({data.python_version()}) splits the corpus "
                            f"into other held-out documents than {out / 'heldout.jsonl'} (Python {metrics['python']})")
    train_ids = data.token_stream(tok, train_docs)
    held_ids = data.token_stream(tok, committed).tolist()
    eval_len = metrics["eval_seq_len"]
    dcfg, start_draft = tcfg.replace(num_layers=args.draft_layers), None
    if args.from_draft:  # its own layer count, whatever --draft-layers says
        start_draft, dcfg = pf.load(out / "draft", dtype="fp32")
        args.draft_layers = dcfg.num_layers
    after_step = heldout_monitor(dcfg, "draft", held_ids[: 32 * eval_len], eval_len, args.eval_every)
    draft, losses = distil_draft(target, tcfg, dcfg, train_ids, args, after_step, start_draft)
    trained = time.perf_counter()
    with atomic_dir(out / "draft") as tmp:
        pf.save(tmp, pf.astype(draft, torch.bfloat16), dcfg, shard_size=SHARD_SIZE,
                extra_files={"tokenizer.model": (out / "target" / "tokenizer.model").read_bytes()})
        draft, dcfg = pf.load(tmp, dtype="fp32")
        train_sample = spaced_sample(train_ids.tolist(), len(held_ids), eval_len)
        before = metrics["draft"]
        metrics["draft"] = draft_figures(target, tcfg, draft, dcfg, losses, args, train_sample, held_ids, eval_len,
                                         trained - start)
        metrics["draft"]["draft_only"] = {key: getattr(args, key) for key in DRAFT_ARGS}
        if args.from_draft:  # the draft it started from, with how that one was made
            metrics["draft"]["draft_only"]["started_from"] = before.get("draft_only")
    with atomic_file(out / "metrics.json") as tmp_file:
        tmp_file.write_text(json.dumps(metrics, indent=2) + "\n")
    write_card(out)
    tqdm.write(f"draft: held-out ppl {metrics['draft']['heldout_ppl']:.2f}, greedy agreement with target "
               f"{metrics['draft']['greedy_agreement_heldout']:.1%}; {time.perf_counter() - start:.0f} s in all",
               file=sys.stderr)
    print(out / "draft")
    return 0


def write_card(folder: Path) -> None:
    """(Re)write `folder/README.md` from its `metrics.json` and the hashes of its other files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    hashes = [(p.relative_to(folder).as_posix(), p.stat().st_size, sha256(p)) for p in files]
    (folder / "README.md").write_text(model_card(json.loads((folder / "metrics.json").read_text()), hashes))


def reruns_text(reruns: list[dict[str, Any]]) -> str:
    """The card's table of later reruns of the recipe (`metrics.json` "reruns"), if any."""
    if not reruns:
        return ""
    rows = "\n".join(f"| `{r['command']}` | {r['seconds']:.0f} s | {r['target_heldout_ppl']:.2f} | "
                     f"{r['draft_heldout_ppl']:.2f} | {r['greedy_agreement']:.1%} | {r['note']} |" for r in reruns)
    return f"""
Reruns of the recipe (same Python, torch and corpus; figures as in Results):

| command | wall time | target held-out ppl | draft held-out ppl | greedy agreement | note |
|---|---|---|---|---|---|
{rows}
"""


def draft_only_text(settings: dict[str, Any] | None, a: dict[str, Any]) -> str:
    """The card's note on a draft distilled again by `--draft-only` (and fine-tuned by further
    `--draft-only --from-draft` runs), if it was."""
    if not settings:
        return ""
    runs = [settings]
    while runs[-1].get("from_draft") and runs[-1].get("started_from"):
        runs.append(runs[-1]["started_from"])
    commands = [f"`pangu train-demo --out models/demo --draft-only --draft-steps {run['draft_steps']}"
                f"{draft_only_flags(run, a)}` ({run['threads']} CPU thread(s))" for run in reversed(runs)]
    return f"""
The draft was then distilled again from the committed target, on the same training documents:
{", then fine-tuned from that draft: ".join(commands)}; the draft's figures above are from the last run.
"""


def draft_only_flags(run: dict[str, Any], a: dict[str, Any]) -> str:
    """The options of a `--draft-only` run that differ from the recipe's, as command-line flags."""
    flags = "".join(f" --{key.replace('_', '-')} {run[key]}" for key in DRAFT_ARGS
                    if key in run and key not in ("draft_steps", "threads", "from_draft", "on_policy",
                                                  "on_policy_windows") and run[key] != a.get(key))
    if run.get("from_draft"):
        flags += " --from-draft"
    if run.get("on_policy"):
        flags += f" --on-policy {run['on_policy']} --on-policy-windows {run['on_policy_windows']}"
    return flags


def continuation_text(d: dict[str, Any]) -> str:
    """The card's figure on the target's own continuations (drafts made before it was measured lack it)."""
    if "greedy_agreement_continuations" not in d:
        return ""
    return (f", and at **{d['greedy_agreement_continuations']:.1%}** of the positions of the target's own greedy "
            f"continuations ({CONTINUATION_TOKENS} tokens, bf16 weights) of {CONTINUATIONS} held-out prompts of "
            f"{CONTINUATION_PROMPT} tokens: the text a speculative draft has to predict")


def model_card(m: dict[str, Any], hashes: list[tuple[str, int, str]]) -> str:
    """The model card: data, sizes, training, results, reproduction, file hashes."""
    c, t, d, a = m["corpus"], m["target"], m["draft"], m["args"]
    da = {**a, **d.get("draft_only", {})}  # the draft's settings (a --draft-only run may differ)
    total = sum(size for _, size, _ in hashes)
    rows = "\n".join(f"| `{name}` | {size:,} | `{digest}` |" for name, size, digest in hashes)
    ref = m["reference"]
    draft_start = ("the previous draft (see Reproduce)" if d.get("draft_only", {}).get("from_draft")
                   else f"target's embedding, first {d['layers']} block(s) and final norm")
    return f"""# pangu-fn demo models

Two small language models of the **openPangu-Embedded family** (pre-RMSNorm, SwiGLU MLP, RoPE,
grouped-query attention with biases on q/k/v/o, tied embeddings), trained on this project's
CPU from a fixed seed by `pangu train-demo`. They exist so that the demo, the tests and every
quality figure (quantization, pruning, speculative decoding, export parity) run on weights that
mean something. They write English in the style of Python's documentation; they know little else.

| model | layers | hidden | heads (kv) | FFN | parameters | context |
|---|---|---|---|---|---|---|
| `target/` | {t["layers"]} | {a["hidden"]} | {a["heads"]} ({a["kv_heads"]}) | {a["ffn"]} | {t["parameters"]:,} | {a["context"]} |
| `draft/` | {d["layers"]} | {a["hidden"]} | {a["heads"]} ({a["kv_heads"]}) | {a["ffn"]} | {d["parameters"]:,} | {a["context"]} |

Weights are stored in bf16 (safetensors, in shards of at most 6 MiB); every figure below was computed in fp32 from
the stored bf16 weights (`pangu_fn.load(path, dtype="fp32")`). Both folders hold the same
`tokenizer.model` and a `config.json` whose bos / eos / pad ids ({m["tokenizer"]["bos_id"]} / \
{m["tokenizer"]["eos_id"]} / {m["tokenizer"]["pad_id"]}) are the tokenizer's.

## Data

Text that every CPython ships, read from the interpreter that trained the models
(**Python {m["python"]}**; the standard library differs between versions):
- the {c["pydoc_documents"]} topics of `pydoc_data.topics.topics` (the language reference pages `help()` shows);
- the docstrings of {c["docstring_documents"]} standard-library modules, collected with `ast` in source order
  (one document per module; `test`/`tests` folders and site-packages skipped; repeated docstrings kept once).

Documents are split by a hash of their name ({a["heldout_fraction"]:.0%} held out):
{c["train_documents"]} train documents ({c["train_chars"]:,} characters, {c["train_tokens"]:,} tokens) and
{c["heldout_documents"]} held-out documents ({c["heldout_chars"]:,} characters, {c["heldout_tokens"]:,} tokens).
The held-out documents are committed as `heldout.jsonl`, so the held-out figures can be recomputed
on any Python version. Each document is followed by the eos token in the token streams.

Tokenizer: SentencePiece BPE, {m["tokenizer"]["vocab_size"]} pieces, trained on the train documents only;
identity normalisation (whitespace and newlines kept), byte fallback for any other character,
so it round-trips any text except U+2581 (SentencePiece's space marker, decoded as a space).
Special ids: unk 0, bos 1, eos 2, pad 3.

## Training

| | target | draft |
|---|---|---|
| steps x batch x window | {t["steps"]} x {a["batch"]} x {a["seq_len"]} | {d["steps"]} x {da["batch"]} x {da["seq_len"]} |
| tokens seen | {t["tokens_seen"]:,} ({t["tokens_seen"] / c["train_tokens"]:.1f} passes) | {d["tokens_seen"]:,} |
| loss | next-token cross-entropy | {da["kl_weight"]} x KL(target ‖ draft) + {1 - da["kl_weight"]:.1f} x next-token |
| start | random (seed {a["seed"]}) | {draft_start} |
| wall time | {t["seconds"]:.0f} s | {d["seconds"]:.0f} s |

AdamW (betas 0.9 / 0.95, weight decay 0.1 on matrices, gradient clip 1.0), learning rate
{a["lr"]:g} with linear warm-up and cosine decay to a tenth, fp32 master weights, torch {m["torch"]},
{a["threads"]} CPU thread(s). Total time including corpus, tokenizer and evaluation:
**{m["seconds"]["total"]:.0f} s** (wall times depend on the machine's other work and `--threads`).

## Results (windows of {m["eval_seq_len"]} tokens)

| | train loss (last 50 steps) | train perplexity | held-out perplexity |
|---|---|---|---|
| target | {t["final_train_loss_50"]:.3f} | {t["train_ppl"]:.2f} | **{t["heldout_ppl"]:.2f}** |
| draft | {d["final_train_loss_50"]:.3f} (distillation loss) | {d["train_ppl"]:.2f} | **{d["heldout_ppl"]:.2f}** |

Train perplexity is measured on {c["train_sample_tokens"]:,} tokens of evenly spaced training windows.
The draft's greedy next token equals the target's at **{d["greedy_agreement_heldout"]:.1%}** of held-out positions{continuation_text(d)}.

Greedy continuation of `{ref["prompt"]!r}` by the target ({ref["max_new_tokens"]} tokens; the test
suite checks these exact tokens, which are also in `metrics.json`):

```text
{ref["prompt"]}{ref["text"]}
```

## Reproduce

```bash
pangu train-demo --out models/demo
```

with the defaults (seed {a["seed"]}). The same Python version and torch build give the same corpus and
the same tokenizer (byte for byte). The weights do not reproduce: the loss curve depends on the
order of floating-point sums (thread count, kernels, machine), a difference in the fourth digit
of the loss after a few dozen steps grows, and at this learning rate the end point moves by more
than the figures' precision. The committed files are the reference; `train-demo` reproduces the
recipe.
{draft_only_text(d.get("draft_only"), a)}{reruns_text(m.get("reruns", []))}
## Files ({total:,} bytes without this card)

| file | bytes | sha256 |
|---|---|---|
{rows}
"""
