"""The batch runner in-process against a real Redis, for the ends that need no model: a
batch cancelled before it ran, and one whose window ran out before a batch worker took it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tokenrelay.api.batch_job import _run
from tokenrelay.api.batch_runner import RunnerSettings
from tokenrelay.queueing.batches import Batch, BatchStore
from tokenrelay.queueing.connection import RedisSettings, connect
from tokenrelay.queueing.files import FileStore

from .batch_files import chat_line, jsonl

LINES = [chat_line(f"c{i}", "some-model", "hi") for i in range(3)]


@pytest.fixture
async def stores(redis_settings: RedisSettings) -> AsyncIterator[tuple[BatchStore, FileStore]]:
    text, data = connect(redis_settings), connect(redis_settings, decode_responses=False)
    yield BatchStore(text, redis_settings.keys), FileStore(data, redis_settings.keys)
    await text.aclose()
    await data.aclose()


async def _batch(stores: tuple[BatchStore, FileStore], expires_in: int) -> Batch:
    batches, files = stores
    upload = await files.create("in.jsonl", "batch", jsonl(LINES))
    now = int(time.time())
    batch = Batch(
        id=batches.new_id(),
        endpoint="/v1/chat/completions",
        input_file_id=upload.id,
        completion_window="24h",
        status="validating",
        created_at=now,
        expires_at=now + expires_in,
    )
    await batches.create(batch)
    return batch


async def _errors(files: FileStore, file_id: str | None) -> list[dict[str, object]]:
    info = await files.get(file_id or "")
    assert info is not None
    data = b"".join([chunk async for chunk in files.content(info)])
    return [json.loads(line) for line in data.splitlines()]


async def _lane_is_empty(redis: aioredis.Redis, settings: RedisSettings) -> bool:
    return not await redis.exists(settings.keys.batch_jobs("some-model"))


async def test_a_batch_cancelled_while_its_runner_waited_ends_cancelled_with_its_counts(
    stores: tuple[BatchStore, FileStore], redis_settings: RedisSettings
) -> None:
    batches, files = stores
    batch = await _batch(stores, 3600)
    # a runner holds it (it is validating the file) when the cancel comes
    assert await batches.acquire(batch.id, "other-runner", 5000)
    assert await batches.cancel(batch.id) == "cancelling"
    await batches.release(batch.id, "other-runner")

    assert await _run(RunnerSettings(redis_settings), batch.id) == "cancelled"
    ended = await batches.get(batch.id)
    assert ended is not None and ended.cancelled_at and ended.in_progress_at is None
    assert (ended.total, ended.completed, ended.failed) == (3, 0, 3)
    cut = await _errors(files, ended.error_file_id)
    assert [x["custom_id"] for x in cut] == ["c0", "c1", "c2"]
    assert {x["error"]["code"] for x in cut} == {"batch_cancelled"}  # type: ignore[index]
    assert await _lane_is_empty(batches.redis, redis_settings)


async def test_a_batch_whose_window_ended_before_it_ran_expires_without_queueing_a_line(
    stores: tuple[BatchStore, FileStore], redis_settings: RedisSettings
) -> None:
    batches, files = stores
    batch = await _batch(stores, -1)
    assert await _run(RunnerSettings(redis_settings), batch.id) == "expired"
    ended = await batches.get(batch.id)
    assert ended is not None and ended.expired_at and ended.output_file_id is None
    assert (ended.total, ended.failed) == (3, 3)
    cut = await _errors(files, ended.error_file_id)
    assert {x["error"]["code"] for x in cut} == {"batch_expired"}  # type: ignore[index]
    assert await _lane_is_empty(batches.redis, redis_settings)
    # an ended batch's job, run again (a retry RQ had queued), does nothing
    assert await _run(RunnerSettings(redis_settings), batch.id) == "expired"


async def test_a_resumed_batch_whose_input_file_is_gone_fails_keeping_its_answers(
    stores: tuple[BatchStore, FileStore], redis_settings: RedisSettings
) -> None:
    """Bug: a runner resuming a dead one's batch whose input file had been deleted failed
    the batch with no output file, losing the lines already answered."""
    batches, files = stores
    batch = await _batch(stores, 3600)
    await batches.move(batch.id, ("validating",), "in_progress", total=3, model="some-model")
    answer = json.dumps({"id": "batch_req_0", "custom_id": "c0", "response": {"status_code": 200}})
    await batches.record(batch.id, 0, answer, True, (5, 7))
    assert await files.delete(batch.input_file_id)

    assert await _run(RunnerSettings(redis_settings), batch.id) == "failed"
    ended = await batches.get(batch.id)
    assert ended is not None and ended.failed_at
    assert ended.errors and ended.errors[0].code == "file_not_found"
    assert (ended.completed, ended.failed) == (1, 2)
    assert [x["custom_id"] for x in await _errors(files, ended.output_file_id)] == ["c0"]
