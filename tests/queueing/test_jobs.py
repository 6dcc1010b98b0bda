"""The producer side of a job stream, against the real Redis: idempotent, bounded enqueue."""

from __future__ import annotations

import json
import time
import uuid

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.messages import MODEL_DEFAULTED, Job, SamplingParams


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


async def test_enqueue_by_lane(aredis: aioredis.Redis, redis_settings: RedisSettings) -> None:
    """Batch API lines go to the model's batch stream, bounded by its own depth, and keep the
    same idempotency marker; the interactive depth (the API's 429 admission) ignores them."""
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    line = make_job()

    assert (await queue.enqueue(line, max_depth=2, lane="batch")).status == "ok"
    assert (await queue.enqueue(line, max_depth=2, lane="batch")).status == "dup"
    assert (await queue.enqueue(make_job(), max_depth=2, lane="batch")).status == "ok"
    assert (await queue.enqueue(make_job(), max_depth=2, lane="batch")).status == "full"

    assert await aredis.xlen(keys.batch_jobs("fake")) == 2
    assert await queue.batch_depth("fake") == 2
    assert await queue.depth("fake") == 0
    assert (await queue.enqueue(make_job(), max_depth=1)).status == "ok"  # lane defaults
    assert await queue.depth("fake") == 1
    assert await aredis.exists(keys.enqueued("fake", line.id))
    # a retried line is a dup on either lane: one request id is queued once
    assert (await queue.enqueue(line, max_depth=2)).status == "dup"
    # both streams of a model share its hash tag, so scripts stay single-slot on a cluster
    assert keys.batch_jobs("fake").split(":")[1] == keys.jobs("fake").split(":")[1]


async def test_cancel_sets_an_expiring_key(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    queue = JobQueue(aredis, keys)
    await queue.cancel("fake", "cmpl-x", ttl=30)
    assert await aredis.exists(keys.cancel("fake", "cmpl-x"))
    assert 0 < await aredis.ttl(keys.cancel("fake", "cmpl-x")) <= 30


# sampling fields left to the model: absent on the wire, so old and new sides interoperate


class _OldSamplingParams(BaseModel):
    """SamplingParams as workers before the model's defaults read it (fixed fallbacks)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    ignore_eos: bool = False


def _wire_params(job: Job) -> dict[str, object]:
    return json.loads(job.model_dump_json())["params"]  # type: ignore[no-any-return]


def test_left_out_sampling_fields_are_absent_on_the_wire() -> None:
    """A request that leaves temperature, top_p and top_k out must reach the worker saying
    so (it fills them from the model's generation_config), not as a fixed 1.0."""
    wire = _wire_params(make_job(max_tokens=5))
    assert not set(MODEL_DEFAULTED) & set(wire), wire
    assert wire["max_tokens"] == 5

    given = make_job(temperature=1.0, top_k=3)
    wire = _wire_params(given)
    assert (wire["temperature"], wire["top_k"]) == (1.0, 3)
    assert "top_p" not in wire
    back = Job.model_validate_json(given.model_dump_json())
    assert back == given
    assert set(MODEL_DEFAULTED) & back.params.model_fields_set == {"temperature", "top_k"}


def test_new_job_reads_on_an_old_worker_and_old_job_on_a_new_one() -> None:
    """Rolling upgrade: an older worker reads a new job's absent fields as its old fixed
    defaults; an older API's job names every field, and a new worker honours them all."""
    old = _OldSamplingParams.model_validate(_wire_params(make_job(max_tokens=5, top_p=0.5)))
    assert (old.temperature, old.top_p, old.top_k, old.max_tokens) == (1.0, 0.5, 0, 5)

    from_old_api = SamplingParams.model_validate_json(_OldSamplingParams().model_dump_json())
    assert set(MODEL_DEFAULTED) <= from_old_api.model_fields_set
