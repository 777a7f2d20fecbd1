"""Iterative pruning: the cubic sparsity schedule of Zhu & Gupta (2017, "To prune, or not to
prune") over n rounds, with recovery training between rounds and masks re-applied after every
optimiser step, so the final round lands exactly on the target."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..evaluate import next_token_loss, perplexity
from ..model import forward
from ..params import Params
from ..train import TrainConfig, random_batches, train
from .calibrate import token_stream
from .recipe import PruneRecipe
from .scope import get, scope_names
from .structured import UnitTracker, structured_step
from .unstructured import apply_masks, compute_masks


def cubic_sparsity(t: int, rounds: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's schedule: `s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3` for round t in
    0..n (`s_0 = s_i`, `s_n = s_f` exactly). Raises ConfigError for t outside 0..n."""
    if not 0 <= t <= rounds:
        raise ConfigError(f"cubic_sparsity: round {t} outside 0..{rounds}")
    return final + (initial - final) * (1 - t / rounds) ** 3


def distill_loss(teacher: Params, cfg: ModelConfig) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """loss(params, tokens [B, T+1]): KL(teacher || student) of the next-token distributions,
    averaged over positions; the teacher (the dense model) runs without gradients."""
    def loss(params: Params, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, :-1]
        with torch.no_grad():
            target = F.log_softmax(forward(teacher, cfg, x)[0].float(), -1)
        student = F.log_softmax(forward(params, cfg, x)[0].float(), -1)
        return F.kl_div(student.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
    return loss


def recover(params: Params, cfg: ModelConfig, stream: torch.Tensor, recipe: PruneRecipe,
            masks: dict[str, torch.Tensor] | None = None, teacher: Params | None = None,
            round_index: int = 0, progress: bool = False) -> tuple[Params, list[float]]:
    """`recipe.recovery_steps` AdamW steps of next-token (or distillation, with `teacher`) loss
    on random windows of the 1-D token `stream`; the pruned entries `masks` (True = zero) are
    zeroed again after every step. Returns (new params, losses)."""
    if recipe.recovery_steps == 0:
        return params, []
    seq_len = min(recipe.seq_len, cfg.max_seq_len - 1)
    if stream.numel() < seq_len + 2:
        raise InputError(f"recovery: expected at least {seq_len + 2} calibration tokens, found {stream.numel()}")
    steps = recipe.recovery_steps
    tc = TrainConfig(steps=steps, lr=recipe.lr, warmup=max(1, steps // 10), weight_decay=0.0)
    loss_fn = distill_loss(teacher, cfg) if teacher is not None else (lambda p, t: next_token_loss(p, cfg, t))
    bound: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reapply_masks(work: Params) -> None:
        if not bound:
            bound.extend((get(work, name), m.to(get(work, name).device)) for name, m in (masks or {}).items())
        for t, m in bound:
            t.masked_fill_(m, 0)

    batches = random_batches(stream, recipe.batch_size, seq_len, seed=recipe.seed + round_index)
    return train(params, cfg, batches, tc, loss_fn=loss_fn, after_step=reapply_masks,
                 desc=f"recover round {round_index}", progress=progress)


def iterative(params: Params, cfg: ModelConfig, recipe: PruneRecipe, calib: Any = None,
              eval_ids: Sequence[int] | None = None, eval_seq_len: int | None = None,
              progress: bool = False) -> tuple[Params, UnitTracker | None, list[dict[str, Any]]]:
    """Run `recipe.rounds` rounds of `recipe.base` pruning, round t reaching the schedule's
    value (of sparsity, or of heads and ffn for structured), each followed by recovery.
    Returns (params, unit tracker for structured or None, per-round records)."""
    if calib is None and (recipe.recovery_steps or recipe.base == "wanda"
                          or (recipe.base == "structured" and recipe.importance != "magnitude")):
        raise ConfigError("prune iterative: recovery and calibration scores need calibration tokens (calib=...)")
    if recipe.base == "structured" and recipe.structured_explicit:
        raise ConfigError("prune iterative: explicit remove_heads / remove_neurons make no schedule; "
                          "use method 'structured'")
    stream = token_stream(calib) if calib is not None else None
    teacher = params if recipe.recovery_loss == "distill" else None
    tracker = UnitTracker(params, cfg) if recipe.base == "structured" else None
    names = scope_names(params, ("blocks",) if tracker else recipe.tensors)
    rounds: list[dict[str, Any]] = []
    for t in tqdm(range(1, recipe.rounds + 1), desc="prune rounds", disable=not progress, dynamic_ncols=True):
        record: dict[str, Any] = {"round": t}
        masks = None
        if tracker is not None:
            heads, ffn = (cubic_sparsity(t, recipe.rounds, f) for f in (recipe.heads, recipe.ffn))
            params = structured_step(params, cfg, recipe, heads, ffn, tracker, calib, progress)
            record.update(heads_target=heads, ffn_target=ffn,
                          heads_removed=sum(tracker.original_kv[p] - len(v) for p, v in tracker.kv.items()),
                          neurons_removed=sum(tracker.original_neurons[p] - len(v) for p, v in tracker.neurons.items()))
        else:
            target = cubic_sparsity(t, recipe.rounds, recipe.sparsity, recipe.initial_sparsity)
            masks = compute_masks(params, recipe.replace(method=recipe.base, sparsity=target), cfg, calib, progress)
            params = apply_masks(params, masks)
            record["sparsity_target"] = target
        if stream is not None:
            params, losses = recover(params, cfg, stream, recipe, masks, teacher, t, progress)
            if losses:
                record.update(recovery_loss_first=losses[0], recovery_loss_last=losses[-1])
        zeros = sum(get(params, n).numel() - int(torch.count_nonzero(get(params, n))) for n in names)
        record["sparsity"] = zeros / sum(get(params, n).numel() for n in names)
        if eval_ids is not None:
            record["perplexity"] = perplexity(params, cfg, eval_ids, eval_seq_len)
        rounds.append(record)
    return params, tracker, rounds
