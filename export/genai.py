"""onnxruntime-genai files for an ort bundle: `genai_config.json` and `tokenizer.json`.

onnxruntime-genai loads a folder holding `genai_config.json`, the decoder ONNX file and a
Hugging Face `tokenizer.json`, and generates with its own loop. Our ort graph already uses
the names it expects (`past_key_values.%d.key`, `present.%d.key`, ...); the decoder is
declared as a generic decoder-only model (type "llama") for every family, since genai only
reads the names and sizes. A SentencePiece BPE model is converted to `tokenizer.json`
(byte fallback, U+2581 for spaces) with the `tokenizers` package.

What genai cannot run is reported in `notes` (one line each) rather than failing the export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pangu_fn.config import ModelConfig
from pangu_fn.errors import FormatError

SPACE = "\u2581"


def write_genai_files(folder: Path, cfg: ModelConfig, manifest: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Write genai_config.json (and tokenizer.json / tokenizer_config.json when the bundle's
    tokenizer converts) into `folder`; returns the manifest's "genai" entry with notes."""
    notes: list[str] = []
    cache = manifest["cache"]
    heads = set(cache["kv_heads"])
    if cache["dtype"] == "bfloat16":
        notes.append("onnxruntime-genai on CPU cannot run this bfloat16 graph (ONNX Runtime's CPU provider "
                     "has no bf16 kernels); export fp32 or fp16 for it")
    if len(heads) > 1:
        notes.append(f"blocks have different KV head counts {cache['kv_heads']}; genai_config.json holds one "
                     "num_key_value_heads, so onnxruntime-genai cannot run this pruned model")
    notes.append("batches of prompts with different lengths: onnxruntime-genai left-pads them, while this graph "
                 "places a token's cache slot at its position (right padding); run batches through pangu_runtime")
    eos = manifest["generation"]["eos_token_ids"]
    config = {
        "model": {
            "type": "llama",
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else 0,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0),
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_seq_len,
            "decoder": {
                "filename": manifest["model"]["file"],
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cache["blocks"],
                "num_key_value_heads": max(heads),
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"max_length": min(cfg.max_seq_len, 4096), "min_length": 0, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": bool(cache.get("share_buffer")),
                   "top_k": 1, "top_p": 1.0,
                   "temperature": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    (folder / "genai_config.json").write_text(json.dumps(config, indent=2) + "\n")

    tok = manifest.get("tokenizer")
    tokenizer_file = None
    if tok is None:
        notes.append("the bundle has no tokenizer; onnxruntime-genai can only be fed token ids")
    elif tok["kind"] == "tokenizers":
        tokenizer_file = tok["file"]
    elif tok["kind"] == "pangu-alpha":
        notes.append("PanGu-α's tokenizer cuts words with jieba first, which tokenizer.json cannot express; "
                     "onnxruntime-genai can only be fed token ids")
    else:
        try:
            (folder / "tokenizer.json").write_text(json.dumps(sentencepiece_to_json(folder / tok["file"]),
                                                              ensure_ascii=False))
            tokenizer_file = "tokenizer.json"
            _write_tokenizer_config(folder, tok)
        except FormatError as e:
            notes.append(f"tokenizer not converted for onnxruntime-genai: {e}")
    return {"config": "genai_config.json", "tokenizer": tokenizer_file, "notes": notes}


def sentencepiece_to_json(path: Path) -> dict[str, Any]:
    """A SentencePiece BPE model as a `tokenizers` JSON (dict): the same pieces and ids,
    merges ordered by the merged piece's score, byte fallback, spaces as U+2581 with the
    dummy prefix the model adds. Raises FormatError for an unreadable or non-BPE (unigram) model."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as e:
        raise FormatError(f"{path}: expected a SentencePiece model (ModelProto), found an unreadable file: {e}") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise FormatError(f"{path}: trainer_spec.model_type: expected BPE, found "
                          f"{pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)}; only BPE "
                          "SentencePiece models convert to tokenizer.json")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED}
    merges = []
    for piece, score, kind in pieces:  # every way of splitting a piece into two known pieces
        if kind not in normal or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((vocab[piece], score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[1], m[0], m[2], m[3]))
    unk = pieces[proto.trainer_spec.unk_id][0]
    model = BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk,
                byte_fallback=proto.trainer_spec.byte_fallback, fuse_unk=True)
    tokenizer = Tokenizer(model)
    norm = []
    spec = proto.normalizer_spec
    if spec.name.startswith(("nmt_nfkc", "nfkc")):
        norm.append(normalizers.NFKC())
    if spec.name.startswith("nmt"):  # NMT rules turn other whitespace characters into spaces
        norm.append(normalizers.Replace(tokenizers_regex(r"[\t\n\r\v\f]"), " "))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Strip(), normalizers.Replace(tokenizers_regex(r" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend(SPACE))
    norm.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    special = [p for p, _, kind in pieces if kind in (pb.ModelProto.SentencePiece.CONTROL,
                                                       pb.ModelProto.SentencePiece.UNKNOWN)]
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in special])
    return json.loads(tokenizer.to_str())


def tokenizers_regex(pattern: str) -> Any:
    from tokenizers import Regex

    return Regex(pattern)


def _write_tokenizer_config(folder: Path, tok: dict[str, Any]) -> None:
    """tokenizer_config.json with the class and special tokens genai's tokenizer reads (a
    copied config keeps its other keys)."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(folder / tok["file"]))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("tokenizer_class", "LlamaTokenizer")
    config.setdefault("add_bos_token", False)
    config.setdefault("add_eos_token", False)
    for kind in ("bos", "eos", "pad"):
        i = tok.get(f"{kind}_id")
        if i is not None and f"{kind}_token" not in config:
            config[f"{kind}_token"] = sp.id_to_piece(int(i))
    if tok.get("unk_id") is None:
        config.setdefault("unk_token", sp.id_to_piece(sp.unk_id()))
    path.write_text(json.dumps(config, indent=2) + "\n")
