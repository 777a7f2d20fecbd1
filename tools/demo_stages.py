"""The stages `pangu demo` runs after the eager PyTorch one: each takes the demo target
through one feature (quantization, pruning, speculative decoding, ONNX export + runtime) and
returns one report row measured with the same yardsticks (`measure_speed`,
`heldout_perplexity`) and a parity check against the eager fp32 model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .demo import Context, Row, heldout_perplexity, measure_speed

RECOVERY_STEPS = 60


def reference_tokens(ctx: Context) -> list[int]:
    """Greedy continuation of the prompt by the eager fp32 target (computed once)."""
    if "greedy" not in ctx.extras:
        import pangu_fn as pf

        out = pf.generate(ctx.params, ctx.cfg, [ctx.prompt_ids], ctx.max_new_tokens, eos_token_ids=())
        ctx.extras["greedy"] = out[0].tokens
    return ctx.extras["greedy"]


def greedy_parity(ctx: Context, tokens: list[int]) -> str:
    """'k/n greedy' : how many leading greedy tokens equal the eager fp32 model's."""
    ref = reference_tokens(ctx)
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    return f"{same}/{len(ref)} greedy"


def calibration_ids(ctx: Context) -> Any:
    """Calibration text: the training split of the pydoc topics (never the held-out documents)."""
    if "calib" not in ctx.extras:
        from pangu_fn import data

        train, _ = data.split(data.pydoc_documents())
        ctx.extras["calib"] = data.token_stream(ctx.tokenizer, train)
    return ctx.extras["calib"]


def quantize_stage(ctx: Context) -> list[Row]:
    """Quantization: int8 and calibrated int4 (GPTQ, group 64) trees, bf16 activations.

    Each row: bytes of the weights, held-out perplexity, speed through torch's int8 / int4
    CPU kernels, and how many greedy tokens equal the fp32 model's."""
    import pangu_fn as pf
    from pangu_fn.quant import calibration_windows

    from .bench import pangu_engine

    rows = []
    for name, recipe in (("int8", pf.QuantRecipe("int8")),
                         ("int4 gptq g64", pf.QuantRecipe("gptq", group_size=64))):
        print(f"  quantizing to {name} ...", flush=True)
        calib = calibration_windows(calibration_ids(ctx), 256, 32) if recipe.calibrated else None
        q = pf.quantize(ctx.params, recipe, ctx.cfg, calib=calib, progress=True)
        tokens = pf.generate(q, ctx.cfg, [ctx.prompt_ids], ctx.max_new_tokens, eos_token_ids=())[0].tokens
        prefill_ms, tok_s = measure_speed(ctx, pangu_engine(q, ctx.cfg))
        ppl = heldout_perplexity(ctx, q, ctx.cfg, f"{name} held-out perplexity")
        rows.append(Row(f"quantized {name}", pf.count_params(q), pf.nbytes(q), ppl, prefill_ms, tok_s,
                        parity=greedy_parity(ctx, tokens), notes="bf16 activations, head kept in bf16"))
    return rows


def prune_stage(ctx: Context) -> list[Row]:
    """Structured pruning: 25% of KV groups and FFN neurons removed, then distillation recovery.

    Taylor importance on calibration text, then `RECOVERY_STEPS` steps distilling the dense
    model; the pruned tensors are physically smaller."""
    import pangu_fn as pf

    from .bench import pangu_engine

    recipe = pf.PruneRecipe(method="iterative", base="structured", heads=0.25, ffn=0.25, importance="taylor",
                            rounds=1, recovery_steps=RECOVERY_STEPS)
    pruned, _ = pf.prune(ctx.params, recipe, calibration_ids(ctx), cfg=ctx.cfg, progress=True)
    prefill_ms, tok_s = measure_speed(ctx, pangu_engine(pruned, ctx.cfg))
    ppl = heldout_perplexity(ctx, pruned, ctx.cfg, "pruned held-out perplexity")
    return [Row("pruned 25% structured", pf.count_params(pruned), pf.nbytes(pruned), ppl, prefill_ms, tok_s,
                notes=f"KV groups + FFN neurons removed, {RECOVERY_STEPS} distillation steps")]


def speculative_stage(ctx: Context) -> list[Row]:
    """Speculative decoding: the demo draft model, prompt lookup, and lookup in front of the draft
    model propose, the target verifies.

    Greedy output must equal the target's own, token for token; acceptance is accepted over
    drafted tokens."""
    import pangu_fn as pf
    from pangu_fn.speculative import LookupFirst, SpecStats, make_drafter

    from .spec_bench import spec_engine

    draft = make_drafter(pf.load(ctx.model_dir / "draft", dtype="fp32"))
    rows = []
    for name, drafter, k in (("speculative, draft model", draft, 4), ("speculative, prompt lookup", "lookup", 4),
                             ("speculative, lookup + draft", LookupFirst(draft), 4)):
        stats = SpecStats()
        prefill_ms, tok_s = measure_speed(ctx, spec_engine(ctx.params, ctx.cfg, drafter, k, False, stats))
        tokens = pf.speculative_generate(ctx.params, ctx.cfg, [ctx.prompt_ids], ctx.max_new_tokens,
                                         eos_token_ids=(), drafter=drafter, k=k)[0].tokens
        rows.append(Row(name, pf.count_params(ctx.params), None, None, prefill_ms, tok_s,
                        acceptance=stats.acceptance_rate, parity=greedy_parity(ctx, tokens), notes=f"K={k}"))
    return rows


def export_stage(ctx: Context) -> list[Row]:
    """ONNX export and the torch-free runtime: the same forward traced to ONNX, run by onnxruntime.

    Parity is the largest logit difference on the prompt and the greedy tokens of
    `pangu_runtime` against the eager fp32 model."""
    import numpy as np
    import torch
    from pangu_export import export_bundle
    from pangu_runtime import Session

    import pangu_fn as pf

    from .ort_bench import runtime_engine

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(ctx.params, ctx.cfg, bundle, target="ort", tokenizer=ctx.model_dir / "target", genai=False)
        session = Session(bundle, threads=torch.get_num_threads())
        ours, _ = pf.forward(ctx.params, ctx.cfg, torch.tensor([ctx.prompt_ids]))
        diff = float(np.abs(session.logits([ctx.prompt_ids])[0] - ours[0].detach().numpy()).max())
        tokens = session.generate([ctx.prompt_ids], ctx.max_new_tokens, eos_token_ids=())[0].tokens
        prefill_ms, tok_s = measure_speed(ctx, runtime_engine(bundle, torch.get_num_threads()))
        size = sum(f.stat().st_size for f in bundle.glob("*.onnx*"))
    return [Row("onnx + pangu_runtime", pf.count_params(ctx.params), size, None, prefill_ms, tok_s,
                parity=f"max|dlogit| {diff:.1e}, {greedy_parity(ctx, tokens)}", notes="fp32, numpy + onnxruntime")]
