"""The HTTP server through real clients: the official `openai` package (sync and async) and
httpx, against a server started in the test on 127.0.0.1. Outputs are compared with the
engine run offline on the same model (the engine's own tests compare it with `generate`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from serve_server import running_server

import pangu_fn as pf
from pangu_fn.serve import EngineSettings, Request, init_engine
from pangu_fn.serve.app import Served, ServerOptions
from pangu_fn.serve.chat import PLAIN_TEMPLATE, ChatTemplate, chat_template_for
from pangu_fn.serve.engine import run_requests
from pangu_fn.tokenizer import load_tokenizer

DEMO = "models/demo/target"
KEY = "test-key"
SETTINGS = EngineSettings(max_batch=4, prefill_chunk=32, prefix_cache=512)


@pytest.fixture(scope="module")
def demo():
    params, cfg = pf.load(DEMO, dtype="fp32")
    tok = load_tokenizer(DEMO)
    return Served("demo", params, cfg, tok, ChatTemplate(chat_template_for(DEMO, tok)))


@pytest.fixture(scope="module")
def url(demo):
    with running_server(lambda: demo, ServerOptions(SETTINGS, api_key=KEY)) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def offline(demo, prompt: str, max_tokens: int, **kw):
    """(text, tokens, finish_reason) of one request run alone through the engine."""
    tok = demo.tokenizer
    req = Request("x", tuple(tok.encode(prompt)), max_tokens, eos=frozenset({demo.cfg.eos_token_id, tok.eos_id}), **kw)
    _, ev = run_requests(init_engine(demo.params, demo.cfg, SETTINGS, tok.decode), demo.params, demo.cfg, [req])
    evs = ev["x"]
    return "".join(e.text for e in evs), [e.token for e in evs], evs[-1].finish_reason


def test_health_models_and_a_greedy_completion(url, client, demo):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["demo"]
    out = client.completions.create(model="demo", prompt="def add(a, b):", max_tokens=12, temperature=0)
    text, tokens, _ = offline(demo, "def add(a, b):", 12)
    assert out.choices[0].text == text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == len(tokens) == 12
    assert out.usage.prompt_tokens == len(demo.tokenizer.encode("def add(a, b):"))


def test_token_id_prompts_and_echo(client, demo):
    ids = demo.tokenizer.encode("import os")
    out = client.completions.create(model="demo", prompt=[ids, ids[:2]], max_tokens=4, temperature=0, echo=True)
    assert len(out.choices) == 2 and out.choices[0].text.startswith(demo.tokenizer.decode(ids))
    assert out.choices[0].text == demo.tokenizer.decode(ids) + offline(demo, "import os", 4)[0]


def test_chat_streaming_and_usage(client, demo):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]
    rendered = ChatTemplate(PLAIN_TEMPLATE).render(messages)
    full = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0)
    assert full.usage.prompt_tokens == len(demo.tokenizer.encode(rendered))
    assert full.choices[0].message.content == offline(demo, rendered, 10)[0]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_strings_split_across_tokens(client, demo):
    text, tokens, _ = offline(demo, "class Point:", 16)
    boundary = len(demo.tokenizer.decode(tokens[:5]))
    stop = text[boundary - 2:boundary + 2]  # spans tokens 5 and 6
    assert len(stop) == 4
    out = client.completions.create(model="demo", prompt="class Point:", max_tokens=16, temperature=0, stop=[stop, "@@"])
    assert out.choices[0].text == text[:text.find(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="demo", prompt="class Point:", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_n_and_seeds_reproduce(client, demo):
    kw = {"model": "demo", "prompt": "for i in", "max_tokens": 8, "temperature": 1.0, "top_p": 0.95}
    a = client.completions.create(n=2, seed=7, **kw)
    b = client.completions.create(n=2, seed=7, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text == client.completions.create(seed=7, **kw).choices[0].text
    assert a.choices[1].text == client.completions.create(seed=8, **kw).choices[0].text
    assert a.choices[0].text == offline(demo, "for i in", 8, sampling=pf.SamplingParams(1.0, 0, 0.95), seed=7)[0]


def test_logprobs(client, demo):
    out = client.completions.create(model="demo", prompt="x = ", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_async_client_concurrent_requests_match_one_by_one(url, client):
    prompts = ["def f(x):", "import sys", "while True:", "# a comment", "return", "print("]
    alone = [client.completions.create(model="demo", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
        outs = await asyncio.gather(*[aclient.completions.create(model="demo", prompt=p, max_tokens=6, temperature=0)
                                      for p in prompts])
        await aclient.close()
        return [o.choices[0].text for o in outs]

    assert asyncio.run(together()) == alone


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_errors(url, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "demo", "prompt": "a", "temperature": 5}, headers=headers)
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="a", extra_body={"logit_bias": {"5": 1}})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=[5] * 200, max_tokens=100)
    assert "200 tokens" in e.value.message and "max_tokens is 100" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[{"role": "user"}])
    # a failing request leaves the server serving
    assert client.completions.create(model="demo", prompt="a", max_tokens=1).usage.completion_tokens == 1


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_loading_queue_full_timeout_and_disconnect():
    """One slot, one queue place, a 1 s queue timeout: /health says 503 while loading; a long
    stream holds the slot, a second request waits, a third gets 429; the waiting one gets 503
    past the timeout; closing the stream mid-way frees the slot."""
    gate = threading.Event()

    def load():
        gate.wait(60)
        cfg = pf.ModelConfig.preset("tiny-gpt").replace(max_seq_len=2048)  # room for a long first request
        return Served("tiny", pf.init_params(cfg, seed=0), cfg)

    options = ServerOptions(EngineSettings(max_batch=1, max_queue=1), queue_timeout=1.0)
    with running_server(load, options, wait_ready=False) as url:
        assert httpx.get(f"{url}/health").status_code == 503
        gate.set()
        for _ in range(600):
            if httpx.get(f"{url}/health").status_code == 200:
                break
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2000, "temperature": 0}
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
                waiting = {}
                t = threading.Thread(target=lambda: waiting.setdefault(
                    "r", httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)))
                t.start()
                for _ in range(100):
                    if metric(url, "pangu_requests_waiting") == 1:
                        break
                    time.sleep(0.05)
                full = http.post("/v1/completions", json=body)
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert error_of(full)["code"] == "queue_full"
                t.join(30)
                assert waiting["r"].status_code == 503 and error_of(waiting["r"])["code"] == "queue_timeout"
                assert metric(url, "pangu_slots_in_use") == 1
            for _ in range(100):  # the stream was closed mid-way: its slot is freed at the next step
                if metric(url, "pangu_slots_in_use") == 0:
                    break
                time.sleep(0.05)
            assert metric(url, "pangu_slots_in_use") == 0
            assert metric(url, 'pangu_requests_finished_total{reason="cancelled"}') == 1
            assert metric(url, 'pangu_requests_finished_total{reason="timeout"}') == 1
            # token-id models without a tokenizer: text is the ids; chat and stop strings are refused
            out = http.post("/v1/completions", json={**body, "max_tokens": 3}).json()
            assert len(out["choices"][0]["text"].split()) == 3
            r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "a"}]})
            assert r.status_code == 400 and error_of(r)["param"] == "messages"
            assert json.loads(http.get("/v1/models").text)["data"][0]["id"] == "tiny"
