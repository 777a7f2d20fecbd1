"""Functional training: a loss over the params tree, AdamW on its leaves, a cosine schedule.

Used to train the demo models and for recovery between pruning rounds. The input tree is
never modified: training works on a detached copy and returns it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelConfig
from .errors import InputError
from .evaluate import next_token_loss
from .generate import generate
from .model import forward
from .params import Params
from .tree import leaves_with_names, unflatten

LossFn = Callable[[Params, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


def cosine_lr(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to `tc.lr`, then cosine decay to `tc.lr * tc.min_lr_ratio` at `tc.steps`."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(params: Params, cfg: ModelConfig, batches: Iterator[torch.Tensor], tc: TrainConfig,
          loss_fn: LossFn | None = None, after_step: Callable[[Params], None] | None = None,
          desc: str = "train", progress: bool = True) -> tuple[Params, list[float]]:
    """Minimise `loss_fn(params, batch)` (default: next-token loss) over `tc.steps` batches of
    tokens `[B, T+1]`. Matrices (>= 2-D leaves) get weight decay; vectors do not.
    `after_step(params)` runs after each update under no_grad (e.g. to re-apply pruning masks,
    in place on the working copy). Returns (trained params, per-step losses)."""
    loss_fn = loss_fn or (lambda p, t: next_token_loss(p, cfg, t))
    named = [(n, leaf.detach().clone().float().requires_grad_(True)) for n, leaf in leaves_with_names(params)]
    dtypes = {n: leaf.dtype for n, leaf in leaves_with_names(params)}
    work = unflatten(dict(named))
    decay = [t for _, t in named if t.dim() >= 2]
    no_decay = [t for _, t in named if t.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
    losses: list[float] = []
    bar = tqdm(range(tc.steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, tc)
        loss = loss_fn(work, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_([t for _, t in named], tc.grad_clip)
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(work)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    trained = unflatten({n: t.detach().to(dtypes[n]) for n, t in named})
    return trained, losses


def distillation_loss(teacher: Params, teacher_cfg: ModelConfig, student_cfg: ModelConfig,
                      kl_weight: float = 0.5) -> LossFn:
    """loss(student, tokens [B, T+1]) = kl_weight * KL(teacher || student) of the next-token
    distributions (mean over positions) + (1 - kl_weight) * next-token cross-entropy. The
    teacher (any config with the same vocabulary, e.g. a deeper model) runs without gradients."""
    def loss(student: Params, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, :-1]
        with torch.no_grad():
            target = F.log_softmax(forward(teacher, teacher_cfg, x)[0].float(), -1).flatten(0, 1)
        logits = forward(student, student_cfg, x)[0].float().flatten(0, 1)
        kl = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
        return kl_weight * kl + (1 - kl_weight) * F.cross_entropy(logits, tokens[:, 1:].flatten())
    return loss


def random_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless batches `[batch_size, seq_len + 1]` of random windows of the 1-D token stream `ids`."""
    gen = torch.Generator().manual_seed(seed)
    n = ids.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def continuation_windows(params: Params, cfg: ModelConfig, ids: torch.Tensor, count: int, width: int,
                         prompt_lengths: tuple[int, int] = (8, 64), seed: int = 0,
                         batch_size: int = 64) -> torch.Tensor:
    """`[count, width]` token windows, each a prompt of `prompt_lengths` (inclusive range) tokens
    cut at random from the 1-D token stream `ids`, followed by the model's greedy continuation
    (no stop at eos). The text a speculative draft has to predict is the target's own, so a
    draft distilled partly on such windows agrees with it more often where it matters
    (on-policy distillation, as in DistillSpec). Needs `width <= cfg.max_seq_len`."""
    lo, hi = prompt_lengths
    if not (1 <= lo <= hi < width <= cfg.max_seq_len and ids.numel() > hi):
        raise InputError(f"continuation_windows: expected 1 <= prompt lengths {lo}..{hi} < width {width} <= "
                         f"the context {cfg.max_seq_len}, and more than {hi} ids, found {ids.numel()}")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
    starts = torch.randint(0, ids.numel() - hi, (count,), generator=gen).tolist()
    prompts = sorted((ids[s:s + n].tolist() for s, n in zip(starts, lengths)), key=len)
    batches = [prompts[i:i + batch_size] for i in range(0, count, batch_size)]
    batches = [[p for p in b if len(p) == n] for b in batches for n in sorted({len(p) for p in b})]
    windows = []
    for batch in tqdm(batches, desc="continuations", dynamic_ncols=True):  # one prompt length a batch
        done = generate(params, cfg, batch, width - len(batch[0]), eos_token_ids=())
        windows += [p + c.tokens for p, c in zip(batch, done)]
    return torch.tensor(windows)


def mixed_batches(batches: Iterator[torch.Tensor], windows: torch.Tensor, fraction: float,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """The batches of `batches`, cut to the width of `windows [N, W]`, with each row replaced
    by a random row of `windows` with probability `fraction`."""
    gen = torch.Generator().manual_seed(seed)
    width = windows.shape[1]
    for batch in batches:
        if batch.shape[1] < width:
            raise InputError(f"mixed_batches: expected batches at least {width} tokens wide, found {batch.shape[1]}")
        take = torch.rand(batch.shape[0], generator=gen) < fraction
        rows = torch.randint(0, windows.shape[0], (batch.shape[0],), generator=gen)
        yield torch.where(take[:, None], windows[rows], batch[:, :width])
