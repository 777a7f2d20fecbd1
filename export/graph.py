"""Thin wrappers that let torch.export trace `pangu_fn.forward` with named tensor inputs.

No layer is written here: each wrapper maps its inputs onto a `KVCache`, calls `forward`
and maps the cache back to outputs. Parameters are registered as buffers under their dotted
tree names (so ONNX initializers are called `blocks.0.attn.q.weight`); a quantized leaf is
stored as its tensors (`....weight.qdata`, `....weight.scales`) and rebuilt inside `forward`
with its class's `from_tensors`.

Convention shared by both layouts: a token's KV slot is its position. Row b's new tokens
take positions `position_ids[b, 0] .. + T - 1`; slots past a row's position are never
attended to (right-padded ragged batches decode correctly, each row at its own position).

- `GrowingDecoder` (target ort, optimum names): `past_key_values.N.key [B, Hkv, P, D]` in,
  `present.N.key [B, Hkv, P + T, D]` out (past followed by the T new slots).
- `StaticDecoder` (target ascend): a fixed `[B, Hkv, S, D]` buffer in, only the T new
  keys/values `[B, Hkv, T, D]` out; the host writes them into its buffer at the positions.
"""

from __future__ import annotations

from typing import Any

import torch

from pangu_fn.cache import KVCache
from pangu_fn.config import ModelConfig
from pangu_fn.io.leaves import leaf_type
from pangu_fn.model import forward
from pangu_fn.params import Params
from pangu_fn.tree import flatten, unflatten


class TreeModule(torch.nn.Module):
    """A params tree held as buffers named by their dotted tree names; `tree()` rebuilds it."""

    def __init__(self, params: Params) -> None:
        super().__init__()
        self._dense: list[str] = []
        self._leaves: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for name, leaf in flatten(params).items():
            if isinstance(leaf, torch.Tensor):
                self._register(name, leaf)
                self._dense.append(name)
            else:  # a quantized leaf: its tensors become buffers, its description is kept
                parts = leaf.to_tensors()
                for suffix, t in parts.items():
                    self._register(f"{name}.{suffix}", t)
                self._leaves[name] = ({"kind": leaf.kind, **leaf.describe()}, list(parts))

    def _register(self, dotted: str, tensor: torch.Tensor) -> None:
        *path, last = dotted.split(".")
        module: torch.nn.Module = self
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_buffer(last, tensor)

    def tree(self) -> Params:
        flat: dict[str, Any] = {name: self.get_buffer(name) for name in self._dense}
        for name, (desc, suffixes) in self._leaves.items():
            parts = {s: self.get_buffer(f"{name}.{s}") for s in suffixes}
            flat[name] = leaf_type(desc["kind"]).from_tensors(parts, desc)
        return unflatten(flat)


class GrowingDecoder(TreeModule):
    """`(input_ids [B,T], attention_mask [B,P+T], position_ids [B,T], *past)` ->
    `(logits [B,T,V], *present)`; `past` alternates key, value per block, each `[B,Hkv,P,D]`.

    `attention_mask` is accepted for optimum / onnxruntime-genai compatibility; visibility
    follows from positions (see the module docstring), so it must be all ones for the slots
    of a row below its position."""

    def __init__(self, params: Params, cfg: ModelConfig) -> None:
        super().__init__(params)
        self.cfg = cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        T = input_ids.shape[1]

        def grow(buf: torch.Tensor) -> torch.Tensor:  # T zero slots after the past (ONNX Pad)
            return torch.nn.functional.pad(buf, (0, 0, 0, T))

        cache = KVCache([grow(k) for k in past[0::2]], [grow(v) for v in past[1::2]], position_ids[:, 0])
        logits, cache = forward(self.tree(), self.cfg, input_ids, cache)
        return (logits, *_interleave(cache.keys, cache.values))


class StaticDecoder(TreeModule):
    """`(input_ids [B,T], position_ids [B,T], *past)` -> `(logits [B,T,V], *new)`; `past`
    alternates key, value per block, each a fixed `[B,Hkv,S,D]` buffer; `new` holds only the
    T new keys/values `[B,Hkv,T,D]` of each, for the host to write at the positions."""

    def __init__(self, params: Params, cfg: ModelConfig) -> None:
        super().__init__(params)
        self.cfg = cfg

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start = position_ids[:, 0]
        cache = KVCache([k.clone() for k in past[0::2]], [v.clone() for v in past[1::2]], start)
        logits, cache = forward(self.tree(), self.cfg, input_ids, cache)
        B, T = input_ids.shape
        slots = (start[:, None] + torch.arange(T, device=start.device))[:, None, :, None]

        def new(buf: torch.Tensor) -> torch.Tensor:
            return buf.gather(2, slots.expand(B, buf.shape[1], T, buf.shape[3]))

        return (logits, *_interleave([new(k) for k in cache.keys], [new(v) for v in cache.values]))


class CacheDecoder(TreeModule):
    """`forward` itself with the params as buffers and the cache as plain tensors:
    `(tokens [B,T], keys, values, lengths [B])` -> `(logits, keys, values, lengths + T)`;
    the key/value buffers are written in place, as `forward` does (target torch)."""

    def __init__(self, params: Params, cfg: ModelConfig) -> None:
        super().__init__(params)
        self.cfg = cfg

    def forward(self, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                lengths: torch.Tensor) -> tuple[Any, ...]:
        logits, cache = forward(self.tree(), self.cfg, tokens, KVCache(keys, values, lengths))
        return logits, cache.keys, cache.values, cache.lengths


def _interleave(keys: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t for kv in zip(keys, values) for t in kv]
