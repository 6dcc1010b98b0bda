"""The batch store against a real Redis: status moves, line records, cancel, lease, listing."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from tokenrelay.queueing.batches import KEEP_ENDED_S, Batch, BatchStore, LineError
from tokenrelay.queueing.connection import RedisSettings, connect


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[BatchStore]:
    client = connect(redis_settings)
    yield BatchStore(client, redis_settings.keys)
    await client.aclose()


async def _new(store: BatchStore, **fields: object) -> Batch:
    now = int(time.time())
    batch = Batch(
        id=store.new_id(),
        endpoint="/v1/chat/completions",
        input_file_id="file-" + "0" * 24,
        completion_window="24h",
        status="validating",
        created_at=now,
        expires_at=now + 86400,
        **fields,  # type: ignore[arg-type]
    )
    await store.create(batch)
    return batch


async def test_a_batch_round_trips_and_moves_only_from_the_statuses_named(
    store: BatchStore,
) -> None:
    batch = await _new(store, metadata={"job": "eval"})
    assert await store.get(batch.id) == batch
    assert await store.move(batch.id, ("in_progress",), "finalizing") == (False, "validating")
    assert await store.move(batch.id, ("validating",), "in_progress", total=3) == (
        True,
        "in_progress",
    )
    got = await store.get(batch.id)
    assert got is not None and got.total == 3 and got.in_progress_at is not None
    assert [b.id for b in await store.active()] == [batch.id]

    errors = [LineError(code="invalid_json_line", message="x", line=2)]
    assert (await store.move(batch.id, ("in_progress",), "failed", errors=errors))[0]
    ended = await store.get(batch.id)
    assert ended is not None and ended.errors == errors and ended.failed_at is not None
    # an ended batch leaves the active set and expires with its output files
    assert await store.active() == []
    assert 0 < await store.redis.ttl(store.keys.batch(batch.id)) <= KEEP_ENDED_S


async def test_a_line_is_recorded_and_counted_once(store: BatchStore) -> None:
    batch = await _new(store)
    assert await store.record(batch.id, 0, '{"a": 1}', ok=True, usage=(5, 7))
    assert not await store.record(batch.id, 0, '{"a": 2}', ok=True, usage=(5, 7))
    assert await store.record(batch.id, 1, '{"b": 1}', ok=False)
    got = await store.get(batch.id)
    assert got is not None
    assert (got.completed, got.failed, got.input_tokens, got.output_tokens) == (1, 1, 5, 7)
    recorded = await store.recorded(batch.id)
    assert [(r.line, r.ok, r.text) for r in recorded] == [
        (0, True, '{"a": 1}'),
        (1, False, '{"b": 1}'),
    ]
    # the records go when the batch ends; a late record of a forgotten batch is refused
    await store.move(batch.id, ("validating",), "completed")
    assert await store.recorded_lines(batch.id) == set()
    await store.delete(batch.id)
    assert not await store.record(batch.id, 2, "{}", ok=True)
    assert not await store.redis.exists(store.keys.batch(batch.id))


async def test_cancel_ends_a_batch_no_runner_holds_and_marks_a_running_one(
    store: BatchStore,
) -> None:
    queued = await _new(store)
    assert await store.cancel(queued.id) == "cancelled"
    got = await store.get(queued.id)
    assert got is not None and got.cancelled_at is not None and got.cancelling_at is not None

    running = await _new(store)
    assert await store.acquire(running.id, "runner-1", 5000)
    assert await store.cancel(running.id) == "cancelling"
    assert await store.cancel(running.id) == "cancelling"
    await store.move(running.id, ("cancelling",), "cancelled")
    assert await store.cancel(running.id) == "cancelled"
    assert await store.cancel("batch_nope") == ""


async def test_the_lease_admits_one_runner_at_a_time(store: BatchStore) -> None:
    batch = await _new(store)
    assert await store.acquire(batch.id, "a", 5000)
    assert not await store.acquire(batch.id, "b", 5000)
    assert await store.acquire(batch.id, "a", 5000)  # its holder takes it again
    assert not await store.refresh(batch.id, "b", 5000)
    await store.release(batch.id, "b")  # not b's to release
    assert await store.leased(batch.id)
    await store.release(batch.id, "a")
    assert await store.acquire(batch.id, "b", 5000)


async def test_listing_pages_newest_first_and_skips_expired_records(store: BatchStore) -> None:
    made = [await _new(store) for _ in range(5)]
    await store.redis.delete(store.keys.batch(made[2].id))  # expired
    page, more = await store.list(2)
    assert [b.id for b in page] == [made[4].id, made[3].id] and more
    page, more = await store.list(2, after=page[-1].id)
    assert [b.id for b in page] == [made[1].id, made[0].id] and not more
    assert not await store.redis.zscore(store.keys.batches, made[2].id)
    assert await store.get("batch_../../x") is None
