"""The producer side of a job stream, against the real Redis: idempotent, bounded enqueue."""

from __future__ import annotations

import time
import uuid

import redis.asyncio as aioredis

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.messages import Job, SamplingParams


def make_job(model: str = "fake", request_id: str | None = None, **params: object) -> Job:
    return Job(
        id=request_id or f"cmpl-{uuid.uuid4().hex}",
        model=model,
        kind="completion",
        prompt="hello",
        params=SamplingParams(**params),
        stream=False,
        created=int(time.time()),
        deadline=time.time() + 60,
    )


async def test_enqueue_is_idempotent_by_request_id(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    job = make_job()

    first = await queue.enqueue(job, max_depth=10)
    second = await queue.enqueue(job, max_depth=10)

    assert first.status == "ok"
    assert second.status == "dup"
    assert second.detail == first.detail  # the retry points at the first entry
    assert await aredis.xlen(keys.jobs("fake")) == 1
    entries = await aredis.xrange(keys.jobs("fake"))
    assert [entry_id for entry_id, _ in entries] == [first.detail]
    assert Job.model_validate_json(entries[0][1]["job"]) == job
    # the marker expires, so request ids are not remembered forever
    assert 0 < await aredis.ttl(keys.enqueued("fake", job.id)) <= 3600

    other = await queue.enqueue(make_job(), max_depth=10)
    assert other.status == "ok"
    assert await queue.depth("fake") == 2


async def test_depth_limit_rejects_without_adding(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    accepted = [make_job() for _ in range(3)]
    for job in accepted:
        assert (await queue.enqueue(job, max_depth=3)).status == "ok"

    rejected = make_job()
    result = await queue.enqueue(rejected, max_depth=3)

    assert result.status == "full"
    assert result.detail == "3"
    assert await aredis.xlen(keys.jobs("fake")) == 3
    # no idempotency marker for a rejected job: a retry once there is room is a fresh enqueue
    assert not await aredis.exists(keys.enqueued("fake", rejected.id))
    ids = [Job.model_validate_json(f["job"]).id for _, f in await aredis.xrange(keys.jobs("fake"))]
    assert ids == [j.id for j in accepted]

    # a full queue still answers 'dup' for a job it already holds (a retried XADD)
    assert (await queue.enqueue(accepted[0], max_depth=3)).status == "dup"

    # finished jobs are XDELed, which makes room again
    first_id = (await aredis.xrange(keys.jobs("fake"), count=1))[0][0]
    await aredis.xdel(keys.jobs("fake"), first_id)
    assert (await queue.enqueue(rejected, max_depth=3)).status == "ok"
    assert await aredis.xlen(keys.jobs("fake")) == 3


async def test_depth_is_per_model(aredis: aioredis.Redis, redis_settings: RedisSettings) -> None:
    queue = JobQueue(aredis, redis_settings.keys)
    assert (await queue.enqueue(make_job("a"), max_depth=1)).status == "ok"
    assert (await queue.enqueue(make_job("a"), max_depth=1)).status == "full"
    assert (await queue.enqueue(make_job("b"), max_depth=1)).status == "ok"


async def test_cancel_sets_an_expiring_key(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    await queue.cancel("fake", "cmpl-x", ttl=30)
    assert await aredis.exists(keys.cancel("fake", "cmpl-x"))
    assert 0 < await aredis.ttl(keys.cancel("fake", "cmpl-x")) <= 30
