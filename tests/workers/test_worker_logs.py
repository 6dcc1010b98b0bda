"""Worker log records carry the request id of the job they are about."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aioredis

from tokenrelay.logs import RequestIdFilter, TextFormatter
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.consumer import JobConsumer
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.queueing.relay import ChunkRelay
from tokenrelay.workers.fake_engine import FakeEngine
from tokenrelay.workers.worker import Worker, WorkerOptions

MODEL = "fake"


async def test_reclaim_line_carries_the_request_id(
    aredis: aioredis.Redis, redis_settings: RedisSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Bug: `reclaimed job ... from a dead worker` had no `[request_id=...]`: it was logged
    by the read loop, outside the job's request scope. It is now logged by the job's task."""
    keys = redis_settings.keys
    job = Job(
        id=f"cmpl-reclaim-{time.monotonic_ns()}",
        request_id="client-req-42",
        model=MODEL,
        kind="completion",
        prompt="hello",
        params=SamplingParams(max_tokens=3),
        stream=False,
        created=int(time.time()),
        deadline=time.time() + 30,
    )
    caplog.handler.addFilter(RequestIdFilter())
    caplog.handler.setFormatter(TextFormatter("worker"))
    caplog.set_level(logging.INFO)
    relay = ChunkRelay(aredis, keys)
    await relay.start()
    worker = Worker(
        aredis, keys, FakeEngine(), WorkerOptions(models=[MODEL], heartbeat_interval=0.1)
    )
    try:
        async with relay.subscribe(MODEL, job.id) as sub:
            dead = JobConsumer(aredis, keys, "dead-worker")  # read the job, then died
            await dead.ensure_groups([MODEL])
            await JobQueue(aredis, keys).enqueue(job, max_depth=10)
            (delivery,) = await dead.read([MODEL], 1, 100)
            running = asyncio.create_task(worker.run())
            async with asyncio.timeout(10):
                chunks = [chunk async for chunk in sub.chunks(job.deadline)]
        assert chunks[-1].done and chunks[-1].error is None
    finally:
        worker.stop()
        if "running" in locals():
            async with asyncio.timeout(10):
                await running
        await relay.close()
    (line,) = [line for line in caplog.text.splitlines() if "reclaimed job" in line]
    assert delivery.entry_id in line and line.endswith("[request_id=client-req-42]"), line
