"""The worker's two lanes against the real Redis: interactive jobs first, Batch API lines
only with the slots they leave, a reserve kept free; the worker's duties (reclaim, cancel,
hand-back) cover batch lines too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.consumer import HANDED_BACK, JobConsumer
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import GROUP, Keys, Lane
from tokenrelay.workers.fake_engine import FakeEngine
from tokenrelay.workers.lanes import batch_reserve, batch_room
from tokenrelay.workers.worker import Worker, WorkerOptions

from ..queueing.test_jobs import make_job

MODEL = "fake"
HANG_GUARD_S = 20.0  # only against a hang


def test_batch_reserve_and_room() -> None:
    assert [batch_reserve(c) for c in (1, 2, 4, 8, 16, 64)] == [0, 1, 1, 2, 4, 16]
    assert batch_room(8, free=8) == 6  # an idle worker: batch lines leave two slots
    assert batch_room(8, free=2) == 0
    assert batch_room(1, free=1) == 1  # a one-slot worker still runs batch lines
    assert batch_room(16, free=0) == 0


async def _pending(redis: aioredis.Redis, keys: Keys, lane: Lane) -> dict[str, int]:
    summary = await redis.xpending(keys.lane_jobs(MODEL, lane), GROUP)
    return {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}


async def _until(check: Callable[[], Awaitable[object]], what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def _enqueue(queue: JobQueue, n: int, lane: Lane, max_tokens: int) -> list[str]:
    jobs = [make_job(MODEL, max_tokens=max_tokens) for _ in range(n)]
    for job in jobs:
        assert (await queue.enqueue(job, max_depth=1000, lane=lane)).status == "ok"
    return [job.id for job in jobs]


@pytest.fixture
async def worker(aredis: aioredis.Redis, redis_settings: RedisSettings) -> Worker:
    options = WorkerOptions(
        models=[MODEL], concurrency=8, heartbeat_interval=0.1, shutdown_grace=0.2
    )
    w = Worker(aredis, redis_settings.keys, FakeEngine(token_delay=0.05), options)
    await w.consumer.ensure_groups([MODEL])
    return w


async def _run(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)
    return task


async def _stop(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.stop()
    async with asyncio.timeout(HANG_GUARD_S):
        await task


async def test_batch_lines_leave_a_reserve_and_interactive_jobs_take_it(
    aredis: aioredis.Redis, redis_settings: RedisSettings, worker: Worker
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    me = worker.options.worker_id
    await _enqueue(queue, 20, "batch", max_tokens=400)  # 20 s each: they hold their slots
    task = await _run(worker)
    try:
        await _until(lambda: _is(aredis, keys, "batch", me, 6), "6 batch lines running")
        await asyncio.sleep(0.3)  # a few more read rounds: still 6 of 8, two slots free
        assert (await _pending(aredis, keys, "batch"))[me] == 6

        await _enqueue(queue, 2, "interactive", max_tokens=400)
        await _until(lambda: _is(aredis, keys, "interactive", me, 2), "2 interactive running")
        assert len(worker.inflight) == 8
        assert (await _pending(aredis, keys, "batch"))[me] == 6
    finally:
        await _stop(worker, task)
    # stopping hands both lanes' unfinished jobs back, each to its own stream
    assert await _pending(aredis, keys, "batch") == {HANDED_BACK: 6}
    assert await _pending(aredis, keys, "interactive") == {HANDED_BACK: 2}


async def _is(redis: aioredis.Redis, keys: Keys, lane: Lane, consumer: str, n: int) -> bool:
    return (await _pending(redis, keys, lane)).get(consumer, 0) == n


async def test_no_batch_line_starts_while_interactive_jobs_wait(
    aredis: aioredis.Redis, redis_settings: RedisSettings, worker: Worker
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    await _enqueue(queue, 5, "batch", max_tokens=2)
    await _enqueue(queue, 30, "interactive", max_tokens=4)
    task = await _run(worker)
    try:
        # every interactive job is done before the first batch line is read: 30 jobs of
        # 0.2 s on 8 slots take about 0.8 s, and the batch stream's group reads none of them
        while await queue.depth(MODEL):
            info = await aredis.xinfo_groups(keys.batch_jobs(MODEL))
            assert info[0]["last-delivered-id"] == "0-0", "a batch line started first"
            await asyncio.sleep(0.01)
        await _until(lambda: _zero(queue.batch_depth(MODEL)), "the batch lines done")
    finally:
        await _stop(worker, task)


async def _zero(depth: Awaitable[int]) -> bool:
    return await depth == 0


async def test_dead_workers_batch_lines_are_reclaimed_and_cancel_works(
    aredis: aioredis.Redis, redis_settings: RedisSettings, worker: Worker
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    short = await _enqueue(queue, 2, "batch", max_tokens=3)
    dead = JobConsumer(aredis, keys, "dead-worker")  # read two lines, then died
    assert len(await dead.read([MODEL], 2, None, lanes=["batch"])) == 2
    (long,) = await _enqueue(queue, 1, "batch", max_tokens=4000)
    task = await _run(worker)
    try:
        # the reclaimed lines run to the end; the long one runs until it is cancelled
        for rid in short:
            await _until(lambda r=rid: aredis.exists(keys.result(MODEL, r)), "a reclaimed line")
        await _until(lambda: _is(aredis, keys, "batch", worker.options.worker_id, 1), "running")
        await queue.cancel(MODEL, long)
        await _until(lambda: _zero(queue.batch_depth(MODEL)), "the cancelled line acked")
    finally:
        await _stop(worker, task)
    assert await _pending(aredis, keys, "batch") == {}
