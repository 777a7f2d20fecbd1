"""`pangu serve-anchor`'s pieces: serve-bench's token count on a llama-server-shaped stream (held
back UTF-8, an empty closing chunk, usage), the summary's ratios and goals against values worked
out by hand, and, where llama-server was built (`pangu serve-anchor` builds it; CI has none, so
that test is skipped), llama-server's greedy tokens on our GGUF equal `pangu_fn.generate`'s."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from pangu_tools import serve_anchor, serve_bench

import pangu_fn as pf


def sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def streamed(chunks: bytes, seen: list[dict]) -> dict:
    """serve_bench.one against a fake server answering `chunks`; `seen` gets the request body."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, content=chunks, headers={"content-type": "text/event-stream"})

    async def go() -> dict:
        async with httpx.AsyncClient(base_url="http://test/v1/", transport=httpx.MockTransport(answer)) as client:
            return await serve_bench.one(client, "m", [5, 6, 7], 4, {"ignore_eos": True})

    return asyncio.run(go())


def text(t: str, reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": reason}]}


def test_bench_counts_the_servers_tokens_and_stamps_chunks_with_text():
    seen: list[dict] = []
    # llama-server's shape: 4 tokens, the 3rd held back (half a UTF-8 character), an empty final chunk
    r = streamed(sse(text("a"), text("b"), text("\u00e9c"), {**text("", "length"), "usage": {"completion_tokens": 4}}),
                 seen)
    assert r["tokens"] == 4 and len(r["itl"]) == 2  # 3 chunks with text: 3 stamps, 2 gaps
    assert seen[0]["ignore_eos"] is True and seen[0]["stream_options"] == {"include_usage": True}
    assert seen[0]["prompt"] == [5, 6, 7] and seen[0]["max_tokens"] == 4
    # no usage: the stamps are the tokens
    assert streamed(sse(text("a"), text(""), text("b", "length")), [])["tokens"] == 2


def level(c: int, tok_s: float, itl: float) -> dict:
    return {"concurrency": c, "output_tokens_per_s": tok_s, "itl_ms": {"p50": itl}}


def test_summary_ratios_and_goals():
    llama = {"server": "llama-server", "dtype": "fp32",
             "levels": serve_bench.with_ratios([level(1, 50.0, 10.0), level(16, 150.0, 40.0)])}
    ours = {"server": "pangu serve", "dtype": "fp32",
            "levels": serve_bench.with_ratios([level(1, 20.0, 20.0), level(16, 90.0, 50.0)])}
    theirs, mine = serve_anchor.summary([llama, ours])
    assert (theirs["tokens_per_s_ratio"], theirs["itl_p50_ratio"], theirs["goals_met"]) == (3.0, 4.0, False)
    assert (mine["tokens_per_s_ratio"], mine["itl_p50_ratio"], mine["goals_met"]) == (4.5, 2.5, True)
    assert mine["vs_llama_server_last_level"] == 0.6 and "vs_llama_server_last_level" not in theirs


def test_llama_server_command_has_a_context_per_slot_and_no_machine_paths():
    cmd = serve_anchor.llama_server_command(Path("/x/bin/llama-server"), Path("/tmp/m.gguf"), 9000, 16, 256, 2)
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(16 * 256)
    assert serve_anchor.shown(cmd).startswith("llama-server -m m.gguf ") and "/" not in serve_anchor.shown(cmd)


BINARY = serve_anchor.source_folder(Path(serve_anchor.DEFAULT_DIR).expanduser(), serve_anchor.LLAMA_VERSION) \
    / serve_anchor.BINARY


@pytest.mark.skipif(not BINARY.is_file(), reason="llama-server is not built (pangu serve-anchor builds it)")
@pytest.mark.parametrize("preset", ["tiny-gpt", "tiny-openpangu"])
def test_llama_server_decodes_our_greedy_tokens(tmp_path, preset):
    from helpers import random_model
    from pangu_export.gguf import export_gguf

    params, cfg = random_model(preset, seed=3)
    gguf = tmp_path / "m.gguf"
    tokenizer = serve_anchor.stand_in_tokenizer(tmp_path / "tok", cfg.vocab_size, cfg.eos_token_id)
    export_gguf(params, cfg, gguf, "f32", tokenizer=tokenizer, progress=False)
    port = serve_anchor.free_port()
    prompt = [7, 3, 11, 5, 2, 9]
    cmd = serve_anchor.llama_server_command(BINARY, gguf, port, 2, cfg.max_seq_len, 1)
    with serve_anchor.serving(cmd, tmp_path / "log", f"http://127.0.0.1:{port}", timeout=60) as url:
        theirs = serve_anchor.llama_greedy(url, prompt, 8)
    assert theirs == pf.generate(params, cfg, [prompt], 8, eos_token_ids=())[0].tokens


def test_stand_in_tokenizer_gives_every_id_its_own_piece(tmp_path):
    d = json.loads((serve_anchor.stand_in_tokenizer(tmp_path, 50257, 50256) / "tokenizer.json").read_text())
    ids = sorted(d["model"]["vocab"].values()) + [t["id"] for t in d["added_tokens"]]
    assert ids == list(range(50257)) and d["added_tokens"][0]["id"] == 50256
    vocab = d["model"]["vocab"]
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in (m.split(" ") for m in d["model"]["merges"]))
    assert vocab["\u010a"] == 10  # byte 10 (newline) as GPT-2 writes it
