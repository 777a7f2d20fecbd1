"""prune(params, recipe, calib) -> (params, report): pruning as a tree transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..evaluate import perplexity
from ..params import Params, decode_layout, validate
from .recipe import PruneRecipe
from .report import PruneReport, build_report
from .schedule import iterative
from .scope import scope_names
from .structured import UnitTracker, structured_step
from .unstructured import apply_masks, compute_masks


def prune(params: Params, recipe: PruneRecipe, calib: Any = None, *, cfg: ModelConfig | None = None,
          eval_ids: Sequence[int] | None = None, eval_seq_len: int | None = None,
          progress: bool = False) -> tuple[Params, PruneReport]:
    """A pruned copy of `params` (the input is never modified; untouched leaves are shared)
    and a PruneReport.

    `calib`: calibration tokens, `[N, T]` or a 1-D stream (Wanda and activation / Taylor
    scores, recovery training). `cfg` is needed by every method that runs the model (wanda,
    n:m by wanda, structured, iterative); plain magnitude and n:m by magnitude work without.
    `eval_ids`: held-out tokens; when given (with cfg) the report holds perplexity before and
    after. Raises ConfigError (bad or incomplete recipe, quantized tensors, a block losing all
    its heads), ShapeError (n:m on inputs not divisible by m), InputError (short calibration)."""
    if not isinstance(recipe, PruneRecipe):
        raise ConfigError(f"prune: expected a PruneRecipe, found {type(recipe).__name__}")
    runs_model = (recipe.method in ("wanda", "structured", "iterative")
                  or (recipe.method == "n:m" and recipe.score == "wanda"))
    if cfg is None and (runs_model or eval_ids is not None):
        raise ConfigError(f"prune: method {recipe.method!r} (or evaluation) runs the model; pass cfg=ModelConfig")
    if cfg is not None:
        validate(params, cfg)
    blocks_only = recipe.method == "structured" or (recipe.method == "iterative" and recipe.base == "structured")
    names = scope_names(params, ("blocks",) if blocks_only else recipe.tensors)
    ppl_before = perplexity(params, cfg, eval_ids, eval_seq_len) if eval_ids is not None else None

    tracker: UnitTracker | None = None
    rounds: list[dict[str, Any]] = []
    if recipe.method in ("magnitude", "wanda", "n:m"):
        out = apply_masks(params, compute_masks(params, recipe, cfg, calib, progress))
    elif recipe.method == "structured":
        tracker = UnitTracker(params, cfg)
        out = structured_step(params, cfg, recipe, recipe.heads, recipe.ffn, tracker, calib, progress)
    else:
        out, tracker, rounds = iterative(params, cfg, recipe, calib, eval_ids, eval_seq_len, progress)
    out = decode_layout(out)  # sliced or masked tensors come out row-major

    ppl = None
    if ppl_before is not None:  # the last round of an iterative run has measured it already
        after = rounds[-1]["perplexity"] if rounds else perplexity(out, cfg, eval_ids, eval_seq_len)
        ppl = {"before": ppl_before, "after": after}
    report = build_report(params, out, names, recipe.method, recipe.summary(), recipe.to_dict(), ppl,
                          tracker.removed() if tracker else None, rounds)
    return out, report
