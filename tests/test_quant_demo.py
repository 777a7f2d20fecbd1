"""Quantization quality on the committed demo model (models/demo): held-out perplexity of
int8 within 1% of the stored bf16 model, int4 group 128 within 8%, and GPTQ strictly better
than round-to-nearest int4 at the same group size. Skipped until the demo model exists.

All of heldout.jsonl is scored (31,941 tokens): on a model this small int4 moves perplexity by
about 0.2%, and on a fraction of the text such differences change sign from one stretch of
text to the next. Every tree runs in the default compute dtype, bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pangu_fn as pf
from pangu_fn import data
from pangu_fn.evaluate import perplexity
from pangu_fn.quant import QuantRecipe, block_linears, calibration_windows, collect_hessians, quantize
from pangu_fn.tokenizer import load_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
CALIB_WINDOWS = 16  # of 256 tokens, from the training documents' pydoc topics

@pytest.fixture(scope="module")
def demo():
    params, cfg = pf.load(DEMO / "target")
    tok = load_tokenizer(DEMO / "target")
    held = data.read_documents(DEMO / "heldout.jsonl")
    ids = data.token_stream(tok, held).tolist()
    seq = min(256, cfg.max_seq_len - 1)
    held_names = {d.name for d in held}
    train_docs = [d for d in data.pydoc_documents() if d.name not in held_names]  # calibration: training text only
    calib = calibration_windows(data.token_stream(tok, train_docs), min(256, cfg.max_seq_len), CALIB_WINDOWS)
    hessians = collect_hessians(params, cfg, calib, block_linears(params))  # shared by the gptq tests
    base = perplexity(params, cfg, ids, seq)
    return params, cfg, ids, seq, hessians, base


@pytest.fixture(scope="module")
def ppl(demo):
    """recipe -> held-out perplexity of the demo quantized by it, each recipe scored once (int4
    group 128 round-to-nearest is both the 8% bound's tree and the symmetric GPTQ's baseline)."""
    params, cfg, ids, seq, hessians, _ = demo
    scores: dict[QuantRecipe, float] = {}

    def score(recipe: QuantRecipe) -> float:
        if recipe not in scores:
            scores[recipe] = perplexity(quantize(params, recipe, cfg=cfg, hessians=hessians), cfg, ids, seq)
        return scores[recipe]

    return score


def test_demo_is_stored_in_bf16(demo):
    assert demo[0]["blocks"][0]["attn"]["q"]["weight"].dtype == torch.bfloat16


def test_int8_perplexity_within_1_percent_of_bf16(demo, ppl):
    assert ppl(QuantRecipe("int8")) <= 1.01 * demo[5]


def test_int4_g128_perplexity_within_8_percent_of_bf16(demo, ppl):
    assert ppl(QuantRecipe("int4", group_size=128)) <= 1.08 * demo[5]


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest_int4_at_group_128(ppl, symmetric):
    rtn = ppl(QuantRecipe("int4", group_size=128, symmetric=symmetric))
    gptq = ppl(QuantRecipe("gptq", group_size=128, symmetric=symmetric))
    assert gptq < rtn
