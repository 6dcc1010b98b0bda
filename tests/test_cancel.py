"""Cancellation with real processes: a client that leaves stops its generation.

A client that closes its stream sets the job's cancel key (through sse-starlette's
disconnect handling) once the API's resume grace has passed with nobody resuming the stream
(api/resume.py); the worker reads it with the next chunk it publishes and stops within a
step. A client that leaves while its job is still queued cancels it too, and the worker then
drops the job without publishing a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import httpx
import pytest
import redis

from tokenrelay.queueing.keys import GROUP, Keys
from tokenrelay.queueing.messages import Job

from .conftest import DEMO_MODEL
from .stack import Stack

FAKE = "fake"
HANG_GUARD_S = 60.0  # only against a hang: nothing below asserts the machine's speed


def chat(model: str, max_tokens: int, stream: bool = True, **extra: object) -> dict:
    return {
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Tell me a very long story about a cat."}],
        **extra,
    }


def read_some(client: httpx.Client, body: dict, events: int) -> str:
    """Open a stream, read ``events`` content events, hang up; returns the request id."""
    rid = ""
    seen = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            assert "error" not in event, event
            rid = event["id"]
            if any(c["delta"].get("content") for c in event["choices"]):
                seen += 1
                if seen >= events:
                    break
    assert seen >= events, "the stream ended before the client hung up"
    return rid


def wait_until(predicate: Callable[[], bool], what: str, interval: float = 0.02) -> None:
    started = time.monotonic()
    while time.monotonic() - started < HANG_GUARD_S:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {HANG_GUARD_S}s waiting for {what}")


def assert_log_stops_growing(r: redis.Redis, log_key: str) -> int:
    """Nothing is added to the chunk log once the worker has acked the cancelled job."""
    assert r.exists(log_key)
    settled = r.xlen(log_key)
    time.sleep(0.6)  # many token intervals of the fake engine and of the CPU model
    assert r.xlen(log_key) == settled, "the worker went on generating after the hang-up"
    return settled


def job_ids_in_stream(r: redis.Redis, model: str, prefix: str) -> list[str]:
    entries = r.xrange(Keys(prefix).jobs(model))
    return [Job.model_validate_json(f["job"]).id for _, f in entries if f]


def test_disconnect_stops_the_fake_worker(stack: Stack, sync_redis: redis.Redis) -> None:
    keys = Keys(stack.prefix)
    stack.api()
    worker = stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        rid = read_some(client, chat(FAKE, 400), events=5)

        # the job is acked (and deleted) after the hang-up
        wait_until(lambda: sync_redis.xlen(keys.jobs(FAKE)) == 0, "the job's ack")
        assert sync_redis.exists(keys.cancel(FAKE, rid))
        final = assert_log_stops_growing(sync_redis, keys.chunk_log(FAKE, rid))
        assert final < 400  # 400 tokens were asked for (20 s of them): it stopped early
        assert sync_redis.xpending(keys.jobs(FAKE), GROUP)["pending"] == 0
        assert not sync_redis.exists(keys.result(FAKE, rid))  # it never finished

        # the freed worker serves the next request
        r = client.post("/v1/completions", json={"model": FAKE, "prompt": "x", "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert "cancelled by its client" in worker.output()


def test_disconnect_stops_the_real_model(model_stack: Stack, sync_redis: redis.Redis) -> None:
    keys = Keys(model_stack.prefix)
    # more tokens than the CPU model makes in the API's resume grace (10 s), after which
    # a stream nobody resumed is cancelled
    body = chat(DEMO_MODEL, 1500, temperature=0.8, ignore_eos=True)
    with httpx.Client(base_url=model_stack.url, timeout=60) as client:
        rid = read_some(client, body, events=3)
    wait_until(
        lambda: rid not in job_ids_in_stream(sync_redis, DEMO_MODEL, model_stack.prefix),
        "the cancelled job's ack",
    )
    final = assert_log_stops_growing(sync_redis, keys.chunk_log(DEMO_MODEL, rid))
    assert final < 1500
    assert not sync_redis.exists(keys.result(DEMO_MODEL, rid))


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_cancelled_queued_job_never_starts(
    stack: Stack, sync_redis: redis.Redis, stream: bool
) -> None:
    keys = Keys(stack.prefix)
    stack.api()
    worker = stack.fake_worker("--fake-token-delay", "0.05", "--limit-worker-concurrency", "1")
    async with httpx.AsyncClient(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        # a long job holds the worker's only slot (headers come with its first chunk)
        long = await client.send(
            client.build_request("POST", "/v1/chat/completions", json=chat(FAKE, 400)),
            stream=True,
        )
        try:
            assert long.status_code == 200
            # a second one waits in the queue; its client gives up before it starts
            queued = asyncio.create_task(
                client.send(
                    client.build_request(
                        "POST", "/v1/chat/completions", json=chat(FAKE, 5, stream=stream)
                    ),
                    stream=True,
                )
            )
            deadline = time.monotonic() + HANG_GUARD_S
            while len(ids := job_ids_in_stream(sync_redis, FAKE, stack.prefix)) < 2:
                assert time.monotonic() < deadline, "the second job was never queued"
                await asyncio.sleep(0.02)
            pending = sync_redis.xpending_range(keys.jobs(FAKE), GROUP, "-", "+", 10)
            assert len(pending) == 1  # the worker holds only the long job
            rid = ids[1]
            queued.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queued

            # the API notices the hang-up and sets the cancel key while the job is queued
            deadline = time.monotonic() + HANG_GUARD_S
            while not sync_redis.exists(keys.cancel(FAKE, rid)):
                assert time.monotonic() < deadline, "the queued job was not cancelled"
                await asyncio.sleep(0.02)
            assert job_ids_in_stream(sync_redis, FAKE, stack.prefix)[1] == rid  # still queued
        finally:
            await long.aclose()  # frees the slot: the worker now reads the cancelled job

    deadline = time.monotonic() + HANG_GUARD_S
    while sync_redis.xlen(keys.jobs(FAKE)) != 0:
        assert time.monotonic() < deadline, "the cancelled job was never taken and dropped"
        await asyncio.sleep(0.02)
    assert sync_redis.xpending(keys.jobs(FAKE), GROUP)["pending"] == 0
    # the worker took it and dropped it without a single chunk
    assert not sync_redis.exists(keys.chunk_log(FAKE, rid))
    assert not sync_redis.exists(keys.result(FAKE, rid))
    assert f"job {rid} was cancelled before it started" in worker.output()
