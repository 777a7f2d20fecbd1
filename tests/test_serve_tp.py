"""Serving a tensor-parallel model: the mirrored engine on 2 gloo ranks against the engine in
one process, and `pangu serve --tp 2` as a process.

The reference is `run_requests` on the unsharded tree in this process: in fp32 on the CPU the
engine's steps are batch-invariant, so a request's tokens do not depend on which requests
shared its steps, and the sharded model's logits equal the whole model's to 1e-5 (see
test_distributed.py), so greedy and seeded tokens must match. A request that arrives after
another with the same prompt prefix finished takes its KV rows from the prefix cache: a rank
that did not mirror that copy would decode it from wrong keys.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import random_model, start_server

import pangu_fn as pf
from pangu_fn.distributed import launch, shard
from pangu_fn.serve.engine import EngineSettings, init_engine, run_requests
from pangu_fn.serve.request import Request
from pangu_fn.serve.tensor_parallel import MirroredRunner, StepMessage, decode, encode, follow

SETTINGS = EngineSettings(max_batch=3, prefix_cache=64, prefill_chunk=8)
SAMPLED = pf.SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
SHARED = [5, 17, 33, 2, 90, 41, 7, 12, 60]
AFTER = Request("after", (150, 151, 152, 153), 5)  # shares no prefix with the others


def _model():
    """Untied: with its tied embeddings this tiny model repeats the last token, whatever the cache."""
    return random_model("tiny-openpangu", tie_embeddings=False)


def _requests() -> tuple[list[Request], list[Request]]:
    """(the first wave, the wave sent once the first has finished: prefix-cache hits). The
    mirrored run then cancels a request after its first token and sends one more, `AFTER`."""
    first = [Request("greedy", tuple(SHARED), 8),
             Request("sampled", (11, 3, 50), 8, SAMPLED, seed=7),
             Request("penalties", (64, 65, 66, 67), 6, pf.SamplingParams(temperature=0.7, repetition_penalty=1.3),
                     presence_penalty=0.5, seed=3, logprobs=2)]
    second = [Request("cached", (*SHARED, 99, 100), 6), Request("cached-sampled", (*SHARED, 3), 6, SAMPLED, seed=11)]
    return first, second


def _summary(events) -> dict:
    return {"tokens": [e.token for e in events if e.token is not None], "reason": events[-1].finish_reason,
            "cached": events[0].cached_tokens}


def _serve_ranks(rank: int, world: int) -> dict | None:
    params, cfg = _model()
    part = shard(params, cfg, rank, world)
    state = init_engine(part, cfg, SETTINGS)
    if rank:
        follow(state, part, cfg)
        return None
    runner = MirroredRunner(state, part, cfg)
    first, second = _requests()

    async def drive() -> dict:
        out = {}
        for wave in (first, second):
            queues = {q.id: runner.add(q) for q in wave}
            for rid, queue in queues.items():
                out[rid] = _summary(await _events(queue))
        queue = runner.add(Request("cancelled", (200, 201, 202), 100))
        first_event = await asyncio.wait_for(queue.get(), 60)
        runner.cancel("cancelled")  # mirrored: every rank frees the slot at the same step
        out["cancelled"] = _summary([first_event, *await _events(queue)])
        out["after"] = _summary(await _events(runner.add(AFTER)))
        return out

    async def _events(queue: asyncio.Queue) -> list:
        events = [await asyncio.wait_for(queue.get(), 60)]
        while events[-1].finish_reason is None:
            events.append(await asyncio.wait_for(queue.get(), 60))
        return events

    try:
        return asyncio.run(drive())
    finally:
        runner.stop()


def test_mirrored_engine_on_two_ranks_gives_the_single_process_tokens():
    params, cfg = _model()
    first, second = _requests()
    _, events = run_requests(init_engine(params, cfg, SETTINGS), params, cfg, [*first, *second, AFTER],
                             arrivals=[0] * len(first) + [40] * len(second) + [80])  # each wave done by then
    expected = {rid: _summary(evs) for rid, evs in events.items()}
    assert expected["cached"]["cached"] > 0 and expected["cached-sampled"]["cached"] > 0
    got, none = launch(_serve_ranks, 2, threads=1)
    assert none is None
    cancelled = got.pop("cancelled")
    assert cancelled["reason"] == "cancelled" and 1 <= len(cancelled["tokens"]) < 100
    assert got == expected


def test_step_messages_round_trip_every_request_field():
    first, second = _requests()
    msg = StepMessage((*first, *second), ("a", "b"), 12345.678901234, True, False)
    assert decode(encode(msg)) == msg


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the child of `parent` started as rank `rank` (Linux /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} under process {parent}")


def test_cli_serve_tp_2_answers_like_one_process():
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    params = pf.init_params(cfg, seed=0)  # the server's weights (`--weights-seed 0`)
    request = Request("r", (5, 6, 7, 8), 8, pf.SamplingParams(temperature=1.0), seed=5, eos=frozenset({cfg.eos_token_id}))
    _, events = run_requests(init_engine(params, cfg, EngineSettings()), params, cfg, [request])
    expected = "".join(f" {e.token}" for e in events["r"] if e.token is not None)
    proc, url = start_server("tiny-openpangu", "--tp", "2")
    try:
        out = httpx.post(f"{url}/completions", timeout=60, json={
            "model": "tiny-openpangu", "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 1.0, "seed": 5}).json()
        assert out["choices"][0]["text"] == expected
        proc.send_signal(signal.SIGTERM)  # rank 0 stops its follower; every process exits 0
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's ranks in Linux /proc")
def test_cli_serve_tp_2_under_torchrun_answers_and_stops_on_sigterm():
    cfg = pf.ModelConfig.preset("tiny-openpangu")
    params = pf.init_params(cfg, seed=0)
    request = Request("r", (9, 8, 7), 6, pf.SamplingParams(temperature=1.0), seed=3, eos=frozenset({cfg.eos_token_id}))
    _, events = run_requests(init_engine(params, cfg, EngineSettings()), params, cfg, [request])
    expected = "".join(f" {e.token}" for e in events["r"] if e.token is not None)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")  # free rendezvous port
    proc, url = start_server("tiny-openpangu", "--tp", "2", launcher=torchrun)
    try:
        ranks = [_rank_pid(proc.pid, rank) for rank in range(2)]
        out = httpx.post(f"{url}/completions", timeout=60, json={
            "model": "tiny-openpangu", "prompt": [9, 8, 7], "max_tokens": 6, "temperature": 1.0, "seed": 3}).json()
        assert out["choices"][0]["text"] == expected
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks: rank 0 stops, then stops rank 1
        proc.wait(timeout=60)  # torchrun itself exits 1 (its agent re-raises the signal)
        err = proc.stderr.read()
        assert "pangu serve: stopped" in err and "forcefully" not in err, err  # no rank needed SIGKILL
        assert not [pid for pid in ranks if _alive(pid)]
    finally:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.environ.get("PANGU_SLOW_TESTS"),
                    reason="another server (~10 s; Linux /proc); set PANGU_SLOW_TESTS=1")
def test_cli_serve_tp_a_dying_rank_takes_the_server_down():
    proc, _ = start_server("tiny-openpangu", "--tp", "2")
    try:
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        start = time.monotonic()
        assert proc.wait(timeout=60) != 0
        assert time.monotonic() - start < 30  # a closed socket fails rank 0's next heartbeat at once
        err = proc.stderr.read()
        assert "the tensor-parallel engine failed" in err and "rank 1 of 2 exited with code -9" in err, err
    finally:
        proc.kill()
        proc.wait()
