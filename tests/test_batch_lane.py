"""The batch lane with real processes: Batch API lines queued on a model's batch stream
neither delay interactive requests nor count against their admission, and status and
metrics show them apart.

The lines are enqueued the way the Batch API's runner does (``JobQueue.enqueue(...,
lane="batch")``), so these tests need nothing of the Batch API itself.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time

import httpx
import redis.asyncio as aioredis

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import GROUP, Keys

from .queueing.test_jobs import make_job
from .stack import Stack
from .test_metrics import _scrape, _value

MODEL = "fake"
HANG_GUARD_S = 60.0  # only against a hang
# The fake engine's time per token. The first token of an idle request takes this long, so
# it dominates an idle TTFT and a busy 2-core machine's scheduling noise does not.
TOKEN_DELAY = 0.2


async def _batch_lines(redis: aioredis.Redis, keys: Keys, n: int, max_tokens: int) -> list[str]:
    queue = JobQueue(redis, keys)
    ids = []
    for _ in range(n):
        job = make_job(MODEL, max_tokens=max_tokens)
        job.deadline = time.time() + 600
        assert (await queue.enqueue(job, max_depth=10_000, lane="batch")).status == "ok"
        ids.append(job.id)
    return ids


async def _cancel(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> None:
    """Cancel the lines, so the worker stops at once rather than after the test."""
    queue = JobQueue(redis, keys)
    for rid in ids:
        await queue.cancel(MODEL, rid)


async def _batch_running(redis: aioredis.Redis, keys: Keys) -> int:
    summary = await redis.xpending(keys.batch_jobs(MODEL), GROUP)
    return int(summary.get("pending") or 0)


async def _until_running(redis: aioredis.Redis, keys: Keys, n: int) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while await _batch_running(redis, keys) < n:
        assert time.monotonic() < deadline, f"never saw {n} batch lines running"
        await asyncio.sleep(0.05)


async def _ttft(client: httpx.AsyncClient) -> float:
    """Seconds from sending a streamed one-token request to its first content event."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "stream": True}
    started = time.perf_counter()
    first = 0.0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():  # read to [DONE]
            if line.startswith("data: {"):
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                if not first and event["choices"] and event["choices"][0].get("text"):
                    first = time.perf_counter() - started
    assert first, "the stream ended without a token"
    return first


async def _p50_ttft(client: httpx.AsyncClient, n: int) -> tuple[float, list[float]]:
    samples = [await _ttft(client) for _ in range(n)]  # one at a time: no queueing of ours
    return statistics.median(samples), samples


async def test_interactive_ttft_with_200_batch_lines(
    stack: Stack, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """With 200 batch lines queued and running, an interactive request's TTFT p50 stays
    within 2x of an idle system's. Without the reserve, the lines (2 s each, started
    together) fill all 16 slots, and a request waits about a second for one to end."""
    keys = redis_settings.keys
    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "16", "--fake-token-delay", str(TOKEN_DELAY))
    async with httpx.AsyncClient(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        await _ttft(client)  # warm-up: connections, first imports
        idle, idle_samples = await _p50_ttft(client, 9)

        lines = await _batch_lines(aredis, keys, 200, max_tokens=int(2 / TOKEN_DELAY))
        try:
            await _until_running(aredis, keys, 12)  # 16 slots less the reserve of 4
            busy, busy_samples = await _p50_ttft(client, 9)
            still_queued = await JobQueue(aredis, keys).batch_depth(MODEL)
        finally:
            await _cancel(aredis, keys, lines)
    print(f"TTFT p50 idle {idle:.3f}s {idle_samples}, with batch lines {busy:.3f}s {busy_samples}")
    assert still_queued > 150  # the lines were still there throughout
    assert busy <= 2 * idle, (idle_samples, busy_samples)


async def test_admission_status_and_metrics_see_the_batch_lane_apart(
    stack: Stack, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """Batch lines beyond --max-queue do not make interactive requests 429; /v1/status,
    `tokenrelay status` and /metrics count them in their own fields."""
    keys = redis_settings.keys
    stack.api("--max-queue", "2")
    stack.fake_worker("--limit-worker-concurrency", "4", "--fake-token-delay", "0.05")
    lines = await _batch_lines(aredis, keys, 20, max_tokens=4000)  # 200 s each
    try:
        await _until_running(aredis, keys, 3)  # 4 slots less the reserve of 1
        async with httpx.AsyncClient(base_url=stack.url, timeout=HANG_GUARD_S) as client:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": False}
            r = await client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text  # 20 batch lines, --max-queue 2: admitted
            (model,) = (await client.get("/v1/status")).json()["models"]
        assert (model["queued"], model["running"]) == (0, 0)
        assert (model["batch_queued"], model["batch_running"]) == (17, 3)

        samples = await asyncio.to_thread(_scrape, stack)
        assert _value(samples, "tokenrelay:num_batch_requests_waiting", model=MODEL) == 17
        assert _value(samples, "tokenrelay:num_batch_requests_running", model=MODEL) == 3
        assert _value(samples, "tokenrelay:num_requests_waiting", model=MODEL) == 0

        out = subprocess.run(
            [*tokenrelay_argv(), "status", "--redis-url", stack.redis_url,
             "--key-prefix", stack.prefix],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()[:2]
        cells = dict(zip(header.split(), row.split(), strict=True))
        assert (cells["QUEUED"], cells["BATCH-QUEUED"], cells["BATCH-RUNNING"]) == ("0", "17", "3")
        assert "batch lines: 17 queued, 3 running" in out.stdout
    finally:
        await _cancel(aredis, keys, lines)
