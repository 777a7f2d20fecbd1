"""`pangu serve` as a process: prints its URL when ready, serves, stops cleanly on SIGTERM and
SIGINT (also with a stream running), and reports bad settings on one line with exit 2. Chat
templates: openPangu's jinja2 template renders as `openpangu_chat_prompt`; a folder's own
`chat_template` wins."""

from __future__ import annotations

import json
import os
import signal
from typing import ClassVar

import httpx
import pytest
from helpers import start_server
from pangu_tools.cli import main

from pangu_fn.serve.chat import OPENPANGU_TEMPLATE, PLAIN_TEMPLATE, ChatTemplate, chat_template_for
from pangu_fn.tokenizer import openpangu_chat_prompt


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.skipif(
    not os.environ.get("PANGU_SLOW_TESTS"), reason="a second server process (~15 s); set PANGU_SLOW_TESTS=1"))])
def test_serves_and_stops_on_a_signal(sig):
    proc, url = start_server("tiny-gpt", "--max-batch", "2")
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        out = httpx.post(f"{url}/completions", json={"model": "tiny-gpt", "prompt": [5, 6], "max_tokens": 3,
                                                     "temperature": 0}, timeout=60).json()
        assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
        with httpx.stream("POST", f"{url}/completions", timeout=60, json={
                "model": "tiny-gpt", "prompt": [5], "max_tokens": 120, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            proc.send_signal(sig)  # with a stream running: it finishes or ends, nothing hangs
            lines = list(lines)
        assert lines[-2:] == ["data: [DONE]", ""] or any('"error"' in line for line in lines)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


def test_bad_settings_exit_2_on_one_line(capsys):
    assert main(["serve", "tiny-gpt", "--max-len", "500", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pangu serve: error: engine: expected 2 <= max_len <= 126 (context 128")


def test_openpangu_template_matches_the_reference_renderer():
    chat = ChatTemplate(OPENPANGU_TEMPLATE)
    for messages in ([{"role": "user", "content": "你好"}],
                     [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]):
        assert chat.render(messages) == openpangu_chat_prompt(messages)
    with pytest.raises(Exception, match="unknown role"):
        chat.render([{"role": "robot", "content": "x"}])


def test_template_choice(tmp_path):
    class Markers:
        special_tokens: ClassVar[dict[str, int]] = {"[unused9]": 9, "[unused10]": 10}

    assert chat_template_for(None, Markers()) == OPENPANGU_TEMPLATE
    assert chat_template_for(None, object()) == PLAIN_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    own = ChatTemplate(chat_template_for(tmp_path, Markers()))
    assert own.render([{"role": "user", "content": "hey"}]) == "hey!"
    assert ChatTemplate(PLAIN_TEMPLATE).render([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


def test_serve_bench_counts_what_the_server_counts(tmp_path):
    from serve_server import running_server

    import pangu_fn as pf
    from pangu_fn.serve.app import Served, ServerOptions
    from pangu_fn.serve.engine import EngineSettings

    cfg = pf.ModelConfig.preset("tiny-gpt")
    served = Served("tiny", pf.init_params(cfg, seed=0), cfg)
    with running_server(lambda: served, ServerOptions(EngineSettings(max_batch=4))) as url:
        out = tmp_path / "bench.json"
        assert main(["serve-bench", url, "--concurrency", "1", "3", "--requests", "4", "--prompt-len", "8",
                     "--max-tokens", "5", "--vocab", "200", "--out", str(out)]) == 0
        generated = next(float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                         if line.startswith("pangu_generation_tokens_total "))
    report = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    assert all(lv["completed"] == 4 and lv["failed"] == 0 and lv["itl_ms"]["p50"] > 0 for lv in report["levels"])
    streamed = sum(lv["output_tokens_per_s"] * lv["seconds"] for lv in report["levels"])
    assert round(streamed) + 2 * 2 == generated  # + a 2-token warm-up per level
