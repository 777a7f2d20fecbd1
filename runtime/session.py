"""Session: run an exported bundle with ONNX Runtime and numpy only (never torch).

`Session(bundle)` validates the manifest (format version, file paths, sha256 of every file)
and opens the decoder graph. `forward(tokens, cache)` is `pangu_fn.forward`'s contract on
numpy arrays; `generate` / `stream` take the same arguments as `pangu_fn.generate` /
`stream` (ragged prompts, SamplingParams, seed, eos) with a seeded `numpy.random.Generator`,
plus prompt-lookup speculative decoding (`lookup=PromptLookup(...)`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import BundleFormatError, GenerationError
from .kv import GrowingCache, SharedCache, StaticCache
from .lookup import PromptLookup, draft_tokens
from .manifest import load_manifest, safe_path
from .sampling import SamplingParams, draw, filter_logits, penalize, sample, softmax
from .tokenizer import BundleTokenizer

DTYPES = {"float32": np.float32, "float16": np.float16}
Cache = GrowingCache | SharedCache | StaticCache


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of row `row`; `finish_reason` ("eos" | "length") is set on the
    row's last token."""

    row: int
    token: int
    finish_reason: str | None = None


@dataclass
class Completion:
    """The new tokens of one prompt (an eos token, when hit, is the last one) and why it stopped."""

    tokens: list[int]
    finish_reason: str


class Session:
    """An ONNX Runtime session over a bundle folder (targets "ort" and "ascend").

    `providers` defaults to CPU; CUDA / CANN execution providers are passed through to ONNX
    Runtime when installed. The KV cache stays in host buffers bound by IO binding.
    Raises BundleError subclasses for a bundle that fails validation."""

    def __init__(self, bundle: str | Path, providers: Sequence[Any] | None = None,
                 threads: int | None = None, verify_hashes: bool = True) -> None:
        self.path = Path(bundle)
        self.manifest = m = load_manifest(self.path, verify_hashes=verify_hashes)
        if m["target"] == "torch":
            raise BundleFormatError(f"{self.path}: a torch (.pt2) bundle; load it with "
                                    "pangu_export.load_program (it needs torch)")
        self.config: dict[str, Any] = m["config"]
        cache = m["cache"]
        self.layout: str = cache["layout"]
        if self.layout not in ("growing", "static"):
            raise BundleFormatError(f"{self.path}: unknown cache layout {self.layout!r}")
        if cache["dtype"] not in DTYPES:
            raise BundleFormatError(f"{self.path}: KV dtype {cache['dtype']!r} is not runnable here; this runtime "
                                    f"holds caches in numpy ({sorted(DTYPES)}); export fp32 or fp16 for it")
        self.kv_dtype = np.dtype(DTYPES[cache["dtype"]])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime fuses int8 DequantizeLinear + MatMul into MatMulNBits; keep the exported
        # accuracy level (0: fp32 arithmetic, exact; 4: int8 activations, faster on CPU)
        level = int(m["model"].get("accuracy_level", 0))
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
        model = safe_path(self.path, m["model"]["file"])
        try:
            self.session = ort.InferenceSession(str(model), opts, providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise BundleFormatError(f"{model}: onnxruntime refused the model: {e}") from None
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != m["inputs"] or names_out != m["outputs"]:
            raise BundleFormatError(f"{model}: graph inputs {names_in} / outputs {names_out} differ from "
                                    f"the manifest's {m['inputs']} / {m['outputs']}")
        self.logits_dtype = np.dtype(np.float16 if self.session.get_outputs()[0].type == "tensor(float16)"
                                     else np.float32)
        self.vocab_size = int(self.config["vocab_size"])
        self.max_seq_len = int(self.config["max_seq_len"])
        self.generation: dict[str, Any] = m.get("generation") or {}
        self._tokenizer: BundleTokenizer | None = None
        self._logits = np.empty(0, self.logits_dtype)

    # -- tokenizer -------------------------------------------------------------------
    @property
    def tokenizer(self) -> BundleTokenizer:
        """The bundle's tokenizer. Raises BundleFormatError when the bundle has none."""
        if self._tokenizer is None:
            tok = self.manifest.get("tokenizer")
            if not tok:
                raise BundleFormatError(f"{self.path}: the bundle has no tokenizer; pass token ids")
            self._tokenizer = BundleTokenizer(safe_path(self.path, tok["file"]), tok["kind"],
                                              tok.get("bos_id"), tok.get("eos_id"), tok.get("pad_id"))
        return self._tokenizer

    # -- the model call ----------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> Cache:
        """Empty cache buffers for `batch_size` rows of up to `max_len` positions (a static
        bundle has its fixed batch size and KV length)."""
        c = self.manifest["cache"]
        past = [n for n in self.manifest["inputs"] if n.startswith("past_key_values.")]
        present = [n for n in self.manifest["outputs"] if n.startswith("present.")]
        if self.layout == "static":
            if batch_size > c["batch_size"]:
                raise GenerationError(f"{self.path}: the bundle has a fixed batch of {c['batch_size']}, "
                                      f"found {batch_size} prompts")
            batch_size, max_len = c["batch_size"], c["max_len"]
            return StaticCache(past, present, c["kv_heads"], c["head_dim"], self.kv_dtype, batch_size, max_len)
        kind = SharedCache if c.get("share_buffer") else GrowingCache
        return kind(past, present, c["kv_heads"], c["head_dim"], self.kv_dtype, batch_size, max_len)

    def forward(self, tokens: np.ndarray, cache: Cache) -> np.ndarray:
        """Logits `[B, T, V]` (float32) for `tokens [B, T]`; row b's tokens take positions
        `cache.lengths[b] ..`, their keys and values are written into the cache and its
        lengths advance by T (as `pangu_fn.forward` does with its cache)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        B, T = tokens.shape
        if B != cache.batch_size:
            raise GenerationError(f"forward: expected {cache.batch_size} rows (the cache's), found {B}")
        run_T = self._run_length(T)
        if run_T != T:  # static graphs run at their compiled lengths: pad on the right
            tokens = np.concatenate([tokens, np.zeros((B, run_T - T), np.int64)], axis=1)
        need = B * run_T * self.vocab_size
        if self._logits.size < need:
            self._logits = np.empty(need, self.logits_dtype)
        logits = self._logits[:need].reshape(B, run_T, self.vocab_size)
        positions = np.ascontiguousarray(cache.lengths[:, None] + np.arange(run_T), dtype=np.int64)
        if isinstance(cache, SharedCache) and B > 1 and T > 1 and cache.filled:
            # GroupQueryAttention on the CPU takes several new tokens after a past only for
            # batch 1: one call per row, on that row's slice of the buffers
            for b in range(B):
                self._run(tokens[b:b + 1], positions[b:b + 1], logits[b:b + 1], cache, slice(b, b + 1))
        else:
            self._run(tokens, positions, logits, cache, slice(None))
        if isinstance(cache, StaticCache):
            cache.advance(run_T, keep=T)
        else:
            cache.advance(run_T)
        return logits[:, :T].astype(np.float32)

    def _run(self, tokens: np.ndarray, positions: np.ndarray, logits: np.ndarray, cache: Cache,
             rows: slice) -> None:
        """One graph call for `tokens [b, T]` at `positions`, writing `logits [b, T, V]`."""
        B, T = tokens.shape
        if isinstance(cache, SharedCache):
            io = cache.binding(self.session, T, rows)
        else:
            io = self.session.io_binding()
            cache.bind(io, T)
        io.bind_cpu_input("input_ids", tokens)
        io.bind_cpu_input("position_ids", positions)
        if self.layout == "growing":  # past + new; GroupQueryAttention takes it as the total length
            past = int(positions[:, 0].max()) if isinstance(cache, SharedCache) else cache.filled
            io.bind_cpu_input("attention_mask", np.ones((B, past + T), np.int64))
        io.bind_output("logits", "cpu", 0, self.logits_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io)

    def _run_length(self, T: int) -> int:
        """The sequence length a call with T tokens runs at (static bundles: the smallest
        compiled prefill length >= T)."""
        lengths = (self.manifest.get("ascend") or {}).get("prefill_lengths")
        if self.layout != "static" or not lengths:
            return T
        fits = [n for n in sorted(lengths) if n >= T]
        if not fits:
            raise GenerationError(f"forward: {T} tokens in one call exceed the largest compiled "
                                  f"length {max(lengths)}")
        return fits[0]

    def _prefill(self, tokens: np.ndarray, cache: Cache) -> np.ndarray:
        """forward() in chunks no longer than the largest compiled length (static bundles)."""
        lengths = (self.manifest.get("ascend") or {}).get("prefill_lengths")
        chunk = max(lengths) if self.layout == "static" and lengths else tokens.shape[1]
        parts = [self.forward(tokens[:, i: i + chunk], cache) for i in range(0, tokens.shape[1], chunk)]
        return np.concatenate(parts, axis=1)

    def logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits `[len_i, V]` for every position of each prompt (ragged, one batched call)."""
        prompts = self.check_prompts(prompts, 0)
        lengths = [len(p) for p in prompts]
        cache = self.new_cache(len(prompts), max(lengths))
        out = self._prefill(self._pad(prompts, cache.batch_size), cache)
        return [out[i, :n] for i, n in enumerate(lengths)]

    # -- generation ----------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Validate prompts and lengths (as pangu_fn.generate does). Raises GenerationError."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(
                isinstance(p, (list, tuple)) for p in prompts):
            raise GenerationError("generate: expected a non-empty list of prompts, each a list of token ids, "
                                  f"found {type(prompts).__name__} {str(prompts)[:60]}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise GenerationError(f"generate: expected max_new_tokens >= 1, found {max_new_tokens!r}")
        out = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"generate: prompt {i} is empty; expected at least one token")
            bad = [t for t in p if not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size]
            if bad:
                raise GenerationError(f"generate: prompt {i} has token id {bad[0]!r} outside the vocabulary "
                                      f"[0, {self.vocab_size})")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise GenerationError(f"generate: prompt {i} has {len(p)} tokens + max_new_tokens {max_new_tokens} "
                                      f"= {len(p) + max_new_tokens}, beyond the context length {self.max_seq_len}")
            out.append([int(t) for t in p])
        return out

    def _pad(self, prompts: list[list[int]], rows: int) -> np.ndarray:
        """Right-padded `[rows, max_len]` token ids (rows past the prompts repeat the last one)."""
        T = max(len(p) for p in prompts)
        tokens = np.zeros((rows, T), np.int64)
        for i in range(rows):
            p = prompts[min(i, len(prompts) - 1)]
            tokens[i, : len(p)] = p
        return tokens

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), seed: int = 0,  # noqa: B008 (frozen)
               eos_token_ids: Iterable[int] | None = None,
               lookup: PromptLookup | None = None) -> Iterator[TokenEvent]:
        """Yield TokenEvents as they are produced, with `pangu_fn.stream`'s semantics.

        `eos_token_ids` None means the bundle's eos ids; `()` never stops early. With
        `lookup`, each step verifies tokens drafted from the row's own history (prompt
        lookup): greedy output is identical to plain decoding, sampled output has the same
        distribution (a draft token is accepted with its probability)."""
        if max_new_tokens < 1:
            raise GenerationError(f"generate: expected max_new_tokens >= 1, found {max_new_tokens!r}")
        prompts = self.check_prompts(prompts, max_new_tokens)
        if eos_token_ids is None:
            eos_token_ids = self.generation.get("eos_token_ids") or []
        eos = {int(t) for t in eos_token_ids}
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], np.int64)
        extra = lookup.num_draft if lookup else 0
        cache = self.new_cache(B, int(lengths.max()) + max_new_tokens + extra)
        rows = cache.batch_size
        rng = np.random.default_rng(seed)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = np.zeros((rows, self.vocab_size), bool)
            for i in range(rows):
                seen[i, prompts[min(i, B - 1)]] = True

        logits = self._prefill(self._pad(prompts, rows), cache)
        cache.lengths[:] = np.concatenate([lengths, np.full(rows - B, lengths[-1])])
        last = logits[np.arange(rows), cache.lengths - 1]
        if lookup is not None:
            yield from self._stream_lookup(prompts, last, cache, max_new_tokens, sampling, rng, seen, eos, lookup)
            return
        active = [True] * B
        for step in range(max_new_tokens):
            next_tokens = sample(last, sampling, rng, seen)
            if seen is not None:
                seen[np.arange(rows), next_tokens] = True
            for row in range(B):
                if not active[row]:
                    continue
                tok = int(next_tokens[row])
                reason = "eos" if tok in eos else "length" if step == max_new_tokens - 1 else None
                if reason:
                    active[row] = False
                yield TokenEvent(row, tok, reason)
            if not any(active):
                return
            last = self.forward(next_tokens[:, None], cache)[:, -1]

    def _stream_lookup(self, prompts: list[list[int]], last: np.ndarray, cache: Cache, max_new_tokens: int,
                       sampling: SamplingParams, rng: np.random.Generator, seen: np.ndarray | None,
                       eos: set[int], lookup: PromptLookup) -> Iterator[TokenEvent]:
        """Prompt-lookup speculative decoding: feed [pending, d1..dk] once, keep the longest
        accepted prefix plus one corrected (or bonus) token per row."""
        B, rows = len(prompts), cache.batch_size
        history = [list(p) for p in prompts]
        produced = [0] * B
        active = [True] * B
        pending = sample(last, sampling, rng, seen)  # one token per row, not yet in the cache
        self.lookup_stats = {"steps": 0, "drafted": 0, "accepted": 0}

        def emit(row: int, tok: int) -> TokenEvent:
            produced[row] += 1
            history[row].append(tok)
            if seen is not None:
                seen[row, tok] = True
            reason = "eos" if tok in eos else "length" if produced[row] == max_new_tokens else None
            if reason:
                active[row] = False
            return TokenEvent(row, tok, reason)

        for row in range(B):
            yield emit(row, int(pending[row]))
        while any(active):
            budget = min(max_new_tokens - produced[r] for r in range(B) if active[r])
            drafts = [draft_tokens(history[r], lookup)[: budget - 1] if r < B and active[r] else []
                      for r in range(rows)]
            k = max(len(d) for d in drafts)
            tokens = np.zeros((rows, k + 1), np.int64)
            for r in range(rows):
                tokens[r, 0] = pending[r]
                tokens[r, 1: 1 + len(drafts[r])] = drafts[r]
            start = cache.lengths.copy()
            for r in range(rows):  # finished rows rewrite slots from 0; nobody reads them again
                if r >= B or not active[r]:
                    cache.lengths[r] = 0
            logits = self.forward(tokens, cache)
            self.lookup_stats["steps"] += 1
            for r in range(rows):
                if r >= B or not active[r]:
                    cache.lengths[r] = start[r]
                    continue
                draft = drafts[r]
                self.lookup_stats["drafted"] += len(draft)
                accepted = 0
                new_token = None
                for j in range(len(draft) + 1):
                    row_seen = None if seen is None else seen[r]
                    scores = penalize(logits[r, j].astype(np.float32), row_seen, sampling.repetition_penalty)
                    if sampling.greedy:
                        choice = int(scores.argmax())
                        if j < len(draft) and choice == draft[j]:
                            accepted += 1
                            yield emit(r, choice)
                            if not active[r]:
                                break
                            continue
                        new_token = choice
                        break
                    probs = softmax(filter_logits(scores[None], sampling))[0]
                    if j < len(draft) and rng.random() < probs[draft[j]]:
                        accepted += 1
                        yield emit(r, draft[j])
                        if not active[r]:
                            break
                        continue
                    if j < len(draft):  # rejected: draw from p without the draft token
                        probs[draft[j]] = 0.0
                        probs = probs / probs.sum()
                    new_token = int(draw(probs[None], rng)[0])
                    break
                self.lookup_stats["accepted"] += accepted
                cache.lengths[r] = start[r] + 1 + accepted
                if active[r] and new_token is not None:
                    pending[r] = new_token
                    yield emit(r, new_token)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0,  # noqa: B008 (frozen)
                 eos_token_ids: Iterable[int] | None = None,
                 lookup: PromptLookup | None = None) -> list[Completion]:
        """New tokens for each prompt, with the reason each stopped. Same arguments and
        semantics as `stream`."""
        out = [Completion([], "length") for _ in prompts]
        for ev in self.stream(prompts, max_new_tokens, sampling, seed, eos_token_ids, lookup):
            out[ev.row].tokens.append(ev.token)
            if ev.finish_reason:
                out[ev.row].finish_reason = ev.finish_reason
        return out

    def generate_text(self, texts: Sequence[str], max_new_tokens: int, add_bos: bool = True,
                      **kw: Any) -> list[str]:
        """Encode, generate and decode with the bundle's tokenizer."""
        tok = self.tokenizer
        prompts = [tok.encode(t, add_bos=add_bos) for t in texts]
        return [tok.decode(c.tokens) for c in self.generate(prompts, max_new_tokens, **kw)]
