"""PyTorch `.pt` / `.pth` / `.bin` state dicts: the seed's `PanguModel` and other layouts,
matched to our names by rules rather than one fixed table.

Loading never unpickles arbitrary objects (`torch.load(weights_only=True)`); a file that needs
it (an `argparse.Namespace` of training args, a custom class) gets a FormatError that says how
to re-save just the weights. Matching, for each key:

1. unwrap `{"state_dict": ...}` / `{"model": ...}` / `{"model_state_dict": ...}` dicts and flatten
   nested dicts with dots (Megatron saves nested dicts);
2. strip wrapper prefixes (`module.` from DataParallel, `_orig_mod.` from torch.compile,
   `model.`, `transformer.`, `backbone.`, `language_model.`, ...);
3. map synonyms (`wte`/`token_embedding`/`embed_tokens`/... -> `tok_embed`, `h.N`/`layers.N`/
   `blocks.N` -> `blocks.N`, `ln_1`/`input_layernorm`/`norm1` -> `attn_norm`, `c_fc`/`fc1`/
   `up_proj`/`dense_h_to_4h` -> `mlp.up`, `gamma`/`beta` -> `weight`/`bias`, ...), splitting a
   fused `c_attn`/`qkv`/`in_proj_weight` into equal q, k, v thirds;
4. transpose a matrix when its shape says it is stored `[in, out]` (the hidden size comes from
   the embedding); a square matrix follows its name's convention (GPT-2 `Conv1D` and MindSpore
   `Mapping` names store `[in, out]`, everything else `[out, in]`).

Two keys that map to the same tensor are refused (no guessing which one is meant), and every
unmatched key and every missing tensor is reported together in one FormatError.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import FormatError
from ..params import expected_shapes
from ..tree import unflatten
from .source import Source, TensorRef, config_from_shapes

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "network", "params")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "transformer.", "backbone.", "language_model.",
                    "base_model.", "gpt.", "decoder.")
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|masked_bias|rotary_emb\.inv_freq|inv_freq|"
                     r"num_batches_tracked|causal_mask|mask)$")
# seed presets (pangu-1b / -7b) and GPT-2 sizes: hidden size -> heads
KNOWN_HEADS = {2048: 16, 4096: 32, 768: 12, 1024: 16, 2560: 32, 5120: 40}

LEAF = r"(?P<leaf>weight|bias|gamma|beta|embedding_table|g|b)"
EMB = r"(?:(?:embedding|embeddings|embed)\.)?"
ATTN = r"(?:attn|attention|self_attn|self_attention)"
MLP = r"(?:mlp|ffn|feed_forward|feedforward|output)"
CONV1D = {"c_attn", "c_fc", "c_proj", "mapping", "projection"}  # names whose matrices are stored [in, out]

TOP_RULES = [
    ((rf"{EMB}(?:wte|tok_embed|tok_embeddings|token_embedding|token_embeddings|embed_tokens|word_embeddings?|"
     rf"word_embedding)\.{LEAF}"), "tok_embed"),
    (rf"{EMB}(?:wpe|pos_embed|pos_embedding|position_embeddings?|positional_embedding)\.{LEAF}", "pos_embed"),
    ((rf"(?:wqe|query_embed|top_query_embedding|top_query_embeddings|topQueryEmbedding\.top_query_embeddings)"
     rf"\.{LEAF}"), "query_embed"),
    (rf"(?:ln_f|final_norm|norm|final_layernorm|final_layer_norm|ln_final|norm_f|layernorm)\.{LEAF}", "final_norm"),
    (rf"(?:lm_head|head|output_layer|embed_out)\.{LEAF}", "lm_head"),
]
BLOCK = r"(?:blocks|layers|h|layer)\.(?P<i>\d+)\."
QUERY = r"(?:query_layer|top_query_layer|topQueryLayer)\."
BLOCK_RULES = [
    (rf"(?:ln_1|ln1|attn_norm|input_layernorm|norm1|layernorm1|attention_norm|attn_ln)\.{LEAF}", "attn_norm"),
    (rf"(?:ln_2|ln2|mlp_norm|post_attention_layernorm|norm2|layernorm2|ffn_norm|mlp_ln)\.{LEAF}", "mlp_norm"),
    (rf"{ATTN}\.(?P<name>q_proj|query|q|wq|dense1|q_lin)\.{LEAF}", "attn.q"),
    (rf"{ATTN}\.(?P<name>k_proj|key|k|wk|dense2|k_lin)\.{LEAF}", "attn.k"),
    (rf"{ATTN}\.(?P<name>v_proj|value|v|wv|dense3|v_lin)\.{LEAF}", "attn.v"),
    (rf"{ATTN}\.(?P<name>o_proj|out_proj|c_proj|dense|proj|wo|projection|o|out|out_lin)\.{LEAF}", "attn.o"),
    (rf"{ATTN}\.(?P<name>c_attn|qkv|qkv_proj|Wqkv|in_proj)\.{LEAF}", "attn.qkv"),
    (rf"{ATTN}\.in_proj_(?P<leaf>weight|bias)", "attn.qkv"),
    (rf"{MLP}\.(?P<name>gate_proj|gate|w_gate)\.{LEAF}", "mlp.gate"),
    (rf"{MLP}\.(?P<name>c_fc|fc1|fc_in|up_proj|dense_h_to_4h|mapping|up|w_in|fc)\.{LEAF}", "mlp.up"),
    (rf"{MLP}\.(?P<name>c_proj|fc2|fc_out|down_proj|dense_4h_to_h|projection|down|w_out)\.{LEAF}", "mlp.down"),
]
RULES = ([(re.compile(p + "$"), t, False) for p, t in TOP_RULES]
         + [(re.compile(BLOCK + p + "$"), t, False) for p, t in BLOCK_RULES]
         + [(re.compile(QUERY + p + "$"), t, True) for p, t in BLOCK_RULES])


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `.pt` file, unwrapped and flattened (see the module docstring)."""
    tensors, _ = load_pt(path)
    return tensors


def load_pt(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(flat tensors, names of the non-tensor entries dropped) of a torch.save file, loaded
    with `weights_only=True` (memory-mapped when the file is a zip archive)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line),
                      str(e).splitlines()[0] if str(e) else "")
        raise FormatError(f"{path}: needs arbitrary unpickling, which pangu-fn refuses ({detail}); on a machine "
                          "you trust, re-save only the weights: torch.save(torch.load(f, weights_only=False)"
                          "['model'], 'weights.pt')") from None
    except Exception as e:  # noqa: BLE001  (torch.load raises many types on hostile bytes)
        first = str(e).splitlines()[0] if str(e) else ""
        raise FormatError(f"{path}: not a readable torch.save file: {type(e).__name__}: {first}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a dict of tensors (a state dict), found {type(obj).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    try:
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and _has_tensors(inner):
                obj = inner
                break
        _flatten(obj, "", tensors, dropped)
    except RecursionError:
        raise FormatError(f"{path}: dicts nested too deeply; expected a state dict") from None
    if not tensors:
        raise FormatError(f"{path}: no tensors found; top-level keys {list(obj)[:8]}")
    return tensors, dropped


def _has_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, dict) and _has_tensors(v)) for v in d.values())


def _flatten(obj: dict, prefix: str, out: dict[str, torch.Tensor], dropped: list[str]) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out, dropped)
        else:
            dropped.append(name)


def strip_wrappers(key: str) -> str:
    """`module.model.blocks.0...` -> `blocks.0...` (leading wrapper prefixes only)."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p) and len(key) > len(p):
                key, changed = key[len(p):], True
    return key


def match_key(key: str) -> tuple[str, str, str] | None:
    """(target without leaf, leaf 'weight'|'bias', source short name) for a stripped key, or None."""
    hits = []
    for rx, target, query in RULES:
        m = rx.match(key)
        if not m:
            continue
        leaf = "bias" if m.group("leaf") in ("bias", "beta", "b") else "weight"
        prefix = "query_layer." if query else (f"blocks.{m.group('i')}." if "i" in rx.groupindex else "")
        hits.append((prefix + target, leaf, m.groupdict().get("name") or ""))
    if len({(h[0], h[1]) for h in hits}) > 1:
        raise FormatError(f"key {key!r} matches several tensors {[h[0] + '.' + h[1] for h in hits]}; refusing to guess")
    return hits[0] if hits else None


def open_pt(path: Path, hint: ModelConfig | None = None, layout: str | None = None) -> Source:
    """A `.pt` state dict (Megatron PanGu-α names are recognised and read by their own table)."""
    from . import alpha

    tensors, dropped = load_pt(path)
    if layout == "megatron" or (layout is None and alpha.is_megatron(list(tensors))):
        return alpha.megatron_source(path, tensors, dropped, hint)
    return match_state_dict(tensors, hint, str(path), dropped, path)


def match_state_dict(tensors: dict[str, torch.Tensor], hint: ModelConfig | None, source: str,
                     dropped: list[str] | None = None, path: Path | None = None) -> Source:
    """Flexible matching of a flat state dict to our names (rules in the module docstring)."""
    matched: dict[str, tuple[str, torch.Tensor, str]] = {}  # our name -> (source key, tensor, short name)
    unmatched, ignored = [], []
    for key, t in tensors.items():
        stripped = strip_wrappers(key)
        try:
            hit = match_key(stripped)
        except FormatError as e:
            raise FormatError(f"{source}: {e}") from None
        if hit is None:
            (ignored if IGNORED.search(stripped) else unmatched).append(key)
            continue
        target, leaf, short = hit
        name = f"{target}.{leaf}"
        if name in matched:
            raise FormatError(f"{source}: both {matched[name][0]!r} and {key!r} look like {name}; refusing to "
                              "guess which one is meant (remove one)")
        matched[name] = (key, t, short)
    if "tok_embed.weight" not in matched:
        raise FormatError(f"{source}: no token embedding among keys {list(tensors)[:8]}; unmatched keys {unmatched}")
    hidden = matched["tok_embed.weight"][1].shape[1]
    flat = _split_fused(matched, source)
    flat = {name: _orient(name, t, short, hidden, source) for name, (t, short) in flat.items()}
    head = flat.get("lm_head.weight")
    if head is not None and head.shape == flat["tok_embed.weight"].shape and torch.equal(head, flat["tok_embed.weight"]):
        del flat["lm_head.weight"]
        ignored.append("lm_head.weight (equal to the embedding: tied)")
    family = ("openpangu" if any(".mlp.gate." in n for n in flat)
              else "alpha" if any(n.startswith("query_layer.") for n in flat) else "gpt")
    shapes = {n: tuple(t.shape) for n, t in flat.items()}
    cfg = config_from_shapes(family, shapes, hint, KNOWN_HEADS, source)
    want = expected_shapes(cfg, unflatten(dict(flat)))
    missing = [n for n in want if n not in flat]
    unexpected = [n for n in flat if n not in want]
    if missing or unmatched or unexpected:
        parts = [f"missing tensors {missing}"] if missing else []
        if unmatched:
            parts.append(f"unmatched keys {unmatched}")
        if unexpected:
            parts.append(f"keys that fit no tensor of this {family} model "
                         f"{[matched.get(n, (n,))[0] for n in unexpected]}")
        raise FormatError(f"{source}: " + "; ".join(parts))
    refs = {n: TensorRef.of(flat[n]) for n in want}
    return Source(path or Path(source), "pt", cfg, refs, skipped=(dropped or []) + ignored,
                  folder=path.parent if path else None)


def _split_fused(matched: dict[str, tuple[str, torch.Tensor, str]], source: str) -> dict[str, tuple[torch.Tensor, str]]:
    """Fused `attn.qkv` -> q, k, v (equal thirds of the output rows)."""
    flat: dict[str, tuple[torch.Tensor, str]] = {}
    hidden = matched["tok_embed.weight"][1].shape[1]
    for name, (key, t, short) in matched.items():
        if ".attn.qkv." not in name:
            flat[name] = (t, short)
            continue
        if t.dim() == 2 and (t.shape[0] == hidden and t.shape[1] % 3 == 0 and t.shape[1] != hidden
                             or short in CONV1D and t.shape[0] == hidden):
            t = t.t()  # stored [in, 3 * out]
        if t.shape[0] % 3:
            raise FormatError(f"{source}: fused {key!r} has {t.shape[0]} output rows; expected 3 equal parts")
        for part, piece in zip("qkv", t.chunk(3, dim=0)):
            target = name.replace(".attn.qkv.", f".attn.{part}.")
            if target in matched:
                raise FormatError(f"{source}: both {key!r} (fused) and {matched[target][0]!r} give {target}; "
                                  "refusing to guess")
            flat[target] = (piece, "")
    return flat


def _orient(name: str, t: torch.Tensor, short: str, hidden: int, source: str) -> torch.Tensor:
    """`t` as `[out, in]`: transposed when its shape (or, for square matrices, its name) says
    it is stored `[in, out]`."""
    if t.dim() != 2 or not name.endswith(".weight") or name.startswith(("tok_embed", "pos_embed", "query_embed", "lm_head")):
        return t
    out_is_hidden = name.endswith(("attn.o.weight", "mlp.down.weight"))
    rows, cols = t.shape
    fits = rows == hidden if out_is_hidden else cols == hidden
    flipped = cols == hidden if out_is_hidden else rows == hidden
    if fits and flipped:  # square: the name's convention decides
        return t.t() if short in CONV1D else t
    if fits:
        return t
    if flipped:
        return t.t()
    raise FormatError(f"{source}: tensor for {name} has shape {list(t.shape)}; expected one side to be the "
                      f"hidden size {hidden}")
