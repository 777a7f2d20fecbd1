"""The OpenAI-compatible HTTP app (FastAPI): it validates requests, feeds an EngineRunner and
turns the engine's events into OpenAI's JSON and server-sent-event shapes.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 while
the model loads, then 200), GET /metrics (Prometheus text). Errors have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..config import ModelConfig
from ..errors import InputError, PanguError
from ..params import Params
from .chat import ChatTemplate
from .engine import EngineSettings, QueueFullError, init_engine
from .metrics import Metrics
from .protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    APIError,
    Job,
    check_fields,
    completion_prompts,
    flag,
    number,
    parse_job,
)
from .request import Event
from .runner import EngineRunner
from .text import ids_text


@dataclass(frozen=True)
class Served:
    """A loaded model as the app serves it: `name` (the `model` field clients send), params and
    config, the tokenizer (None: token-id prompts only) and chat template (None: no chat), and
    the drafter (None: none; what `init_engine` takes) drafting `draft_k` tokens per step."""

    name: str
    params: Params
    cfg: ModelConfig
    tokenizer: Any = None
    template: ChatTemplate | None = None
    drafter: Any = None
    draft_k: int = 4


@dataclass(frozen=True)
class ServerOptions:
    """`api_key` (None: no auth), `queue_timeout` seconds a request may wait for a slot (None:
    forever), the engine's settings, the seed of seeds for unseeded requests and the runner
    class that steps the engine (tensor parallelism: `tensor_parallel.MirroredRunner`)."""

    settings: EngineSettings = EngineSettings()  # noqa: RUF009 (frozen)
    api_key: str | None = None
    queue_timeout: float | None = None
    seed: int = 0
    runner: type[EngineRunner] = EngineRunner


class _Loaded:
    def __init__(self, served: Served, runner: EngineRunner) -> None:
        self.served, self.runner = served, runner
        tok = served.tokenizer
        self.detokenize = tok.decode if tok is not None else ids_text
        eos = {served.cfg.eos_token_id} | ({tok.eos_id} if tok is not None and tok.eos_id is not None else set())
        self.eos = frozenset(e for e in eos if e is not None)

    def token_text(self, token: int) -> str:
        return self.detokenize([token]) if self.served.tokenizer is not None else f" {token}"


def create_app(load: Callable[[], Served], options: ServerOptions = ServerOptions(),
               on_ready: Callable[[Exception | None], None] | None = None) -> FastAPI:
    """An app that calls `load()` in a thread at startup (GET /health answers 503 until it
    returns), then serves the model. `on_ready(None)` runs once the engine is started,
    `on_ready(error)` if loading failed (the app then answers 500)."""
    metrics = Metrics()
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            served = load()
            tok = served.tokenizer
            state = init_engine(served.params, served.cfg, options.settings,
                                tok.decode if tok is not None else None, options.seed, served.drafter, served.draft_k)
            box["loaded"] = _Loaded(served, options.runner(state, served.params, served.cfg,
                                                           metrics.engine))
            metrics.engine(state)
        except Exception as e:  # noqa: BLE001 (reported by /health and every route)
            box["error"] = e
        if on_ready is not None:
            on_ready(box.get("error"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=start, name="pangu-load", daemon=True)
        loader.start()
        yield
        loader.join()
        if "loaded" in box:
            box["loaded"].runner.stop()

    app = FastAPI(title="pangu-fn", lifespan=lifespan)

    def stop_engine() -> None:
        """End the engine now: waiting handlers and open streams get a "shutting down" error."""
        if "loaded" in box:
            box["loaded"].runner.stop()

    app.state.stop_engine = stop_engine

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def loaded() -> _Loaded:
        if "error" in box:
            raise APIError(500, f"the model failed to load: {box['error']}", type="server_error")
        if "loaded" not in box:
            raise APIError(503, "the model is loading", type="server_error", code="loading")
        return box["loaded"]

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {options.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request, allowed: set[str]) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        body = check_fields(body, allowed)
        if not isinstance(body.get("model"), str):
            raise APIError(400, "model: expected the model's name (see GET /v1/models)", param="model")
        return body

    def check_model(m: _Loaded, body: dict[str, Any]) -> None:
        if body["model"] != m.served.name:
            raise APIError(404, f"the model {body['model']!r} does not exist; this server has {m.served.name!r}",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> Response:
        if "error" in box:
            return JSONResponse({"status": "error", "message": str(box["error"])}, status_code=500)
        if "loaded" not in box:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        m = loaded()
        return JSONResponse({"object": "list", "data": [
            {"id": m.served.name, "object": "model", "created": 0, "owned_by": "pangu-fn",
             "max_model_len": options.settings.request_limit(m.served.cfg)}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        m = loaded()
        body = await read_body(request, COMPLETION_FIELDS)
        check_model(m, body)
        tok = m.served.tokenizer
        prompts, texts = completion_prompts(body, tok.encode if tok is not None else None, m.served.cfg.vocab_size)
        job = parse_job(body, prompts, texts, options.settings.request_limit(m.served.cfg), False, tok is not None)
        logprobs = number(body, "logprobs", None, 0, 20, integer=True)
        echo = flag(body, "echo")
        if echo and logprobs is not None:
            raise APIError(400, "echo with logprobs (the prompt's log-probabilities) is not supported", param="echo")
        job = replace(job, logprobs=logprobs, echo=echo)
        return await _run(request, m, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        authorize(request)
        m = loaded()
        body = await read_body(request, CHAT_FIELDS)
        check_model(m, body)
        if m.served.template is None or m.served.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so it has no chat template; use /v1/completions "
                                "with token ids", param="messages")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: expected a non-empty list", param="messages")
        try:
            text = m.served.template.render(messages)
        except InputError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = tuple(m.served.tokenizer.encode(text))
        job = parse_job(body, [ids], [text], options.settings.request_limit(m.served.cfg), True, True)
        want = flag(body, "logprobs")
        top = number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not want:
            raise APIError(400, "top_logprobs needs logprobs true", param="top_logprobs")
        return await _run(request, m, replace(job, logprobs=(top or 0) if want else None), chat=True)

    async def _run(request: Request, m: _Loaded, job: Job, chat: bool) -> Response:
        base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        deadline = None if options.queue_timeout is None else time.monotonic() + options.queue_timeout
        requests = job.requests(base, m.eos, deadline)
        queue: asyncio.Queue = asyncio.Queue()
        added = []
        try:
            for r in requests:
                m.runner.add(r, queue)
                added.append(r.id)
        except QueueFullError as e:
            _cancel(m, added)
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except PanguError as e:
            _cancel(m, added)
            raise APIError(400, str(e)) from None
        except RuntimeError:  # the runner has stopped
            raise APIError(503, "the server is shutting down", type="server_error", code="shutdown") from None
        tracker = _Tracker(metrics, [r.id for r in requests], time.perf_counter())
        first = await _first_events(request, m, queue, tracker)
        if job.stream:
            return StreamingResponse(_stream(request, m, job, base, chat, queue, tracker, first),
                                     media_type="text/event-stream")
        events = first
        while not tracker.done:
            ev = await _next(request, m, queue, tracker)
            events.append(ev)
        return JSONResponse(_complete(m, job, base, chat, events))

    return app


class _Tracker:
    """The choices of one HTTP request: which have finished, and their latency metrics."""

    def __init__(self, metrics: Metrics, ids: list[str], start: float) -> None:
        self.metrics, self.ids, self.start = metrics, ids, start
        self.last: dict[str, float] = {}
        self.finished: dict[str, str] = {}
        self.index = {rid: k for k, rid in enumerate(ids)}

    def see(self, ev: Event) -> None:
        now = time.perf_counter()
        if ev.token is not None:
            prev = self.last.get(ev.id)
            if prev is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe(now - prev)
            self.last[ev.id] = now
        if ev.finish_reason is not None:
            self.finished[ev.id] = ev.finish_reason
            if ev.finish_reason in ("stop", "length"):
                self.metrics.e2e.observe(now - self.start)

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.ids)

    def unfinished(self) -> list[str]:
        return [i for i in self.ids if i not in self.finished]


def _cancel(m: _Loaded, ids: list[str]) -> None:
    for rid in ids:
        m.runner.cancel(rid)


async def _next(request: Request, m: _Loaded, queue: asyncio.Queue, tracker: _Tracker) -> Event:
    """The next event; cancels the choices left when the client has gone, and turns a queue
    timeout or a shutdown into an error."""
    while True:
        try:
            ev = await asyncio.wait_for(queue.get(), 0.5)
            break
        except TimeoutError:
            if await request.is_disconnected():
                _cancel(m, tracker.unfinished())
                raise APIError(499, "the client closed the connection") from None
    tracker.see(ev)
    if ev.finish_reason == "timeout":
        _cancel(m, tracker.unfinished())
        raise APIError(503, "the request waited longer than the queue timeout for a free slot; retry later",
                       type="server_error", code="queue_timeout", headers={"Retry-After": "1"})
    if ev.finish_reason == "shutdown":
        raise APIError(503, "the server is shutting down", type="server_error", code="shutdown")
    return ev


async def _first_events(request: Request, m: _Loaded, queue: asyncio.Queue, tracker: _Tracker) -> list[Event]:
    """Events until every choice has produced one (so a queue timeout is still an HTTP error)."""
    events, started = [], set()
    while len(started) < len(tracker.ids):
        ev = await _next(request, m, queue, tracker)
        events.append(ev)
        started.add(ev.id)
    return events


def _usage(job: Job, events: list[Event]) -> dict[str, int]:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(ev.token is not None for ev in events)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(m: _Loaded, events: list[Event], offset: int) -> dict[str, Any]:
    tokens = [m.token_text(ev.token) for ev in events]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [ev.logprob for ev in events],
            "top_logprobs": [{m.token_text(t): lp for t, lp in ev.top_logprobs} for ev in events],
            "text_offset": offsets}


def _chat_logprobs(m: _Loaded, events: list[Event]) -> dict[str, Any]:
    def item(token: int, lp: float) -> dict[str, Any]:
        text = m.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**item(ev.token, ev.logprob), "top_logprobs": [item(t, lp) for t, lp in ev.top_logprobs]}
                        for ev in events]}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _complete(m: _Loaded, job: Job, base: str, chat: bool, events: list[Event]) -> dict[str, Any]:
    by_choice: dict[int, list[Event]] = {}
    ids = [f"{base}-{k}" for k in range(len(job.prompts) * job.n)]
    index = {rid: k for k, rid in enumerate(ids)}
    for ev in events:
        by_choice.setdefault(index[ev.id], []).append(ev)
    choices = []
    for k in range(len(ids)):
        evs = by_choice.get(k, [])
        tokens = [ev for ev in evs if ev.token is not None]
        text = "".join(ev.text for ev in evs)
        reason = _finish(evs[-1].finish_reason)
        want = job.logprobs is not None
        if chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": text},
                            "logprobs": _chat_logprobs(m, tokens) if want else None, "finish_reason": reason})
        else:
            prefix = (job.prompt_texts[k // job.n] or m.detokenize(job.prompts[k // job.n])) if job.echo else ""
            choices.append({"index": k, "text": prefix + text,
                            "logprobs": _completion_logprobs(m, tokens, len(prefix)) if want else None,
                            "finish_reason": reason})
    return {"id": base, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": m.served.name, "choices": choices, "usage": _usage(job, events)}


async def _stream(request: Request, m: _Loaded, job: Job, base: str, chat: bool, queue: asyncio.Queue,
                  tracker: _Tracker, first: list[Event]) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token, `data: [DONE]` last. A client that goes away
    (the generator is closed) cancels its choices; an error mid-stream is sent as an error event."""
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    all_events: list[Event] = []
    offsets = dict.fromkeys(tracker.ids, 0)

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        body = {"id": base, "object": obj, "created": created, "model": m.served.name, "choices": choices}
        if job.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def for_event(ev: Event) -> list[str]:
        k = tracker.index[ev.id]
        out = []
        if ev.token is not None:
            if chat:
                lp = _chat_logprobs(m, [ev]) if job.logprobs is not None else None
                out.append(chunk([{"index": k, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}]))
            else:
                lp = _completion_logprobs(m, [ev], offsets[ev.id]) if job.logprobs is not None else None
                offsets[ev.id] += len(m.token_text(ev.token))
                reason = _finish(ev.finish_reason) if ev.finish_reason else None
                out.append(chunk([{"index": k, "text": ev.text, "logprobs": lp, "finish_reason": reason}]))
        if ev.finish_reason is not None and (chat or ev.token is None):
            delta = {"delta": {}} if chat else {"text": ""}
            out.append(chunk([{"index": k, **delta, "logprobs": None, "finish_reason": _finish(ev.finish_reason)}]))
        return out

    try:
        for k, rid in enumerate(tracker.ids):
            if chat:
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            elif job.echo:
                yield chunk([{"index": k, "text": job.prompt_texts[k // job.n] or m.detokenize(job.prompts[k // job.n]),
                              "logprobs": None, "finish_reason": None}])
        for ev in first:
            all_events.append(ev)
            for c in for_event(ev):
                yield c
        while not tracker.done:
            try:
                ev = await _next(request, m, queue, tracker)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            all_events.append(ev)
            for c in for_event(ev):
                yield c
        if job.include_usage:
            yield chunk([], _usage(job, all_events))
        yield "data: [DONE]\n\n"
    finally:
        _cancel(m, tracker.unfinished())
