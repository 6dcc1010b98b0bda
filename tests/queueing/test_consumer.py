"""The consumer side of a job stream against the real Redis: read, ack, reclaim, dead-letter.

Reclaim must only take jobs whose owner's per-model alive key is gone, however long the job
has been pending, and each reclaim counts a delivery.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.consumer import JobConsumer
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import GROUP, Keys
from tokenrelay.queueing.messages import Job

from .test_jobs import make_job

MODEL = "fake"
HOUR_MS = 3_600_000


async def consumers(aredis: aioredis.Redis, keys: Keys, *names: str) -> tuple[JobConsumer, ...]:
    out = tuple(JobConsumer(aredis, keys, name) for name in names)
    await out[0].ensure_groups([MODEL])
    return out


async def alive(aredis: aioredis.Redis, keys: Keys, worker: str) -> None:
    await aredis.set(keys.alive(MODEL, worker), 1, ex=60)


async def pending(aredis: aioredis.Redis, keys: Keys) -> list[dict]:
    return await aredis.xpending_range(keys.jobs(MODEL), GROUP, "-", "+", 100)


async def test_ensure_groups_is_repeatable(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    (a,) = await consumers(aredis, redis_settings.keys, "A")
    await a.ensure_groups([MODEL, MODEL])
    groups = await aredis.xinfo_groups(redis_settings.keys.jobs(MODEL))
    assert [g["name"] for g in groups] == [GROUP]


async def test_read_and_ack(aredis: aioredis.Redis, redis_settings: RedisSettings) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    job = make_job()
    await JobQueue(aredis, keys).enqueue(job, max_depth=10)

    (delivery,) = await a.read([MODEL], count=5, block_ms=100)
    assert delivery.attempt == 1
    assert Job.model_validate_json(delivery.payload) == job
    assert await b.read([MODEL], count=5, block_ms=100) == []  # one consumer per job

    # after a restart (or a connection error) A re-reads its own unacked job: a re-delivery
    again = await a.read([MODEL], count=5, block_ms=100, own_pending=True)
    assert [(d.entry_id, d.attempt) for d in again] == [(delivery.entry_id, 2)]

    await a.ack(MODEL, delivery.entry_id)
    assert await aredis.xlen(keys.jobs(MODEL)) == 0
    assert await pending(aredis, keys) == []
    assert await a.read([MODEL], count=5, block_ms=100, own_pending=True) == []


async def test_own_pending_reread_is_a_new_attempt(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """Bug: a job re-read from the consumer's own pending list (after its task failed on a
    Redis error) came back as attempt 1, so the rerun's chunks restarted at seq 0 under the
    attempt its first run had used; the API took them for duplicates and spliced the rerun's
    later chunks onto the first run's. The re-read must count as a delivery, and jobs still
    running here must be neither re-read nor counted."""
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    queue = JobQueue(aredis, keys)
    for _ in range(3):
        await queue.enqueue(make_job(), max_depth=10)
    first = await a.read([MODEL], count=5, block_ms=100)
    assert [d.attempt for d in first] == [1, 1, 1]
    running, failed = first[0].entry_id, [d.entry_id for d in first[1:]]

    again = await a.read([MODEL], count=5, block_ms=100, own_pending=True, running=[running])
    assert [(d.entry_id, d.attempt) for d in again] == [(f, 2) for f in failed]
    assert [d.payload for d in again] == [d.payload for d in first[1:]]
    # the count bounds it; the next re-read is attempt 3
    (third,) = await a.read([MODEL], count=1, block_ms=100, own_pending=True, running=[running])
    assert (third.entry_id, third.attempt) == (failed[0], 3)
    counts = {e["message_id"]: e["times_delivered"] for e in await pending(aredis, keys)}
    assert counts == {running: 1, failed[0]: 3, failed[1]: 2}
    # new jobs are still first deliveries
    await queue.enqueue(make_job(), max_depth=10)
    (new,) = await a.read([MODEL], count=5, block_ms=100)
    assert new.attempt == 1


async def test_own_pending_reread_leaves_a_job_another_worker_reclaimed(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    await JobQueue(aredis, keys).enqueue(make_job(), max_depth=10)
    await a.read([MODEL], count=1, block_ms=100)
    (claimed,) = await b.reclaim(MODEL)  # A's heartbeat lapsed (no alive key)
    assert await a.read([MODEL], count=5, block_ms=100, own_pending=True) == []
    (entry,) = await pending(aredis, keys)
    assert (entry["consumer"], entry["times_delivered"]) == ("B", 2)


async def test_own_pending_reread_acks_an_entry_deleted_while_pending(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    await JobQueue(aredis, keys).enqueue(make_job(), max_depth=10)
    (delivery,) = await a.read([MODEL], count=1, block_ms=100)
    await aredis.xdel(keys.jobs(MODEL), delivery.entry_id)
    assert await a.read([MODEL], count=5, block_ms=100, own_pending=True) == []
    assert await pending(aredis, keys) == []


async def test_live_owner_keeps_its_job_however_long_idle(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    await alive(aredis, keys, "A")
    await alive(aredis, keys, "B")
    await JobQueue(aredis, keys).enqueue(make_job(), max_depth=10)
    (delivery,) = await a.read([MODEL], count=1, block_ms=100)

    # make the pending entry look an hour idle (a long generation), still owned by A
    await aredis.xclaim(
        keys.jobs(MODEL), GROUP, "A", 0, [delivery.entry_id], idle=HOUR_MS, justid=True
    )
    (entry,) = await pending(aredis, keys)
    assert entry["time_since_delivered"] >= HOUR_MS

    assert await b.reclaim(MODEL) == []
    (entry,) = await pending(aredis, keys)
    assert entry["consumer"] == "A"
    assert entry["times_delivered"] == 1


async def test_dead_owner_job_is_reclaimed_exactly_once(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b, c = await consumers(aredis, keys, "A", "B", "C")
    for name in "ABC":
        await alive(aredis, keys, name)
    job = make_job()
    await JobQueue(aredis, keys).enqueue(job, max_depth=10)
    (first,) = await a.read([MODEL], count=1, block_ms=100)
    assert await b.reclaim(MODEL) == []

    await aredis.delete(keys.alive(MODEL, "A"))  # A's heartbeat expired

    (claimed,) = await b.reclaim(MODEL)
    assert claimed.entry_id == first.entry_id
    assert claimed.attempt == 2
    assert Job.model_validate_json(claimed.payload) == job
    # nobody gets it a second time: not B again, not another live worker
    assert await b.reclaim(MODEL) == []
    assert await c.reclaim(MODEL) == []
    (entry,) = await pending(aredis, keys)
    assert entry["consumer"] == "B"
    assert entry["times_delivered"] == 2

    # if B dies too, the next reclaim is attempt 3
    await aredis.delete(keys.alive(MODEL, "B"))
    (third,) = await c.reclaim(MODEL)
    assert (third.entry_id, third.attempt) == (first.entry_id, 3)


async def test_reclaim_skips_live_owners_and_respects_count(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b, c = await consumers(aredis, keys, "A", "B", "C")
    await alive(aredis, keys, "B")
    await alive(aredis, keys, "C")
    queue = JobQueue(aredis, keys)
    for _ in range(4):
        await queue.enqueue(make_job(), max_depth=10)
    mine = await b.read([MODEL], count=2, block_ms=100)  # B, alive, holds the two oldest
    dead = await a.read([MODEL], count=2, block_ms=100)  # A dies holding the next two

    # the two oldest pending entries belong to B (alive): the scan must look past them
    (one,) = await c.reclaim(MODEL, count=1)
    (two,) = await c.reclaim(MODEL, count=5)
    assert sorted([one.entry_id, two.entry_id]) == sorted(d.entry_id for d in dead)
    assert await c.reclaim(MODEL, count=5) == []
    owners = {e["message_id"]: e["consumer"] for e in await pending(aredis, keys)}
    assert all(owners[d.entry_id] == "B" for d in mine)


async def test_reclaim_acks_an_entry_deleted_while_pending(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    await JobQueue(aredis, keys).enqueue(make_job(), max_depth=10)
    (delivery,) = await a.read([MODEL], count=1, block_ms=100)
    await aredis.xdel(keys.jobs(MODEL), delivery.entry_id)
    assert await b.reclaim(MODEL) == []
    assert await pending(aredis, keys) == []


async def test_dead_letter_moves_the_job_out(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    queue = JobQueue(aredis, keys)
    job = make_job()
    await queue.enqueue(job, max_depth=10)
    await a.read([MODEL], count=1, block_ms=100)
    (claimed,) = await b.reclaim(MODEL)  # A has no alive key: dead

    await b.dead_letter(claimed, "too many deliveries")

    assert await aredis.xlen(keys.jobs(MODEL)) == 0
    assert await pending(aredis, keys) == []
    assert await queue.dead_letter_count(MODEL) == 1
    ((_, fields),) = await aredis.xrange(keys.dead_letters(MODEL))
    assert Job.model_validate_json(fields["job"]) == job
    assert fields["reason"] == "too many deliveries"
    assert fields["attempts"] == "2"
    assert await b.reclaim(MODEL) == []


async def test_is_cancelled(aredis: aioredis.Redis, redis_settings: RedisSettings) -> None:
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    await JobQueue(aredis, keys).cancel(MODEL, "r2")
    assert await a.is_cancelled(MODEL, ["r1", "r2"]) == [False, True]
    assert await a.is_cancelled(MODEL, []) == []


# the batch lane: the same group on its own stream, each delivery acting on the one it came from


async def test_batch_lane_read_and_ack(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    queue = JobQueue(aredis, keys)
    groups = await aredis.xinfo_groups(keys.batch_jobs(MODEL))
    assert [g["name"] for g in groups] == [GROUP]  # ensure_groups made both lanes' groups
    line, request = make_job(), make_job()
    await queue.enqueue(line, max_depth=10, lane="batch")
    await queue.enqueue(request, max_depth=10)

    # a plain read sees the interactive stream only; a batch read, the batch stream only
    (first,) = await a.read([MODEL], count=5, block_ms=None)
    assert (first.lane, Job.model_validate_json(first.payload)) == ("interactive", request)
    (batch,) = await a.read([MODEL], count=5, block_ms=None, lanes=["batch"])
    assert (batch.lane, batch.attempt, Job.model_validate_json(batch.payload)) == (
        "batch",
        1,
        line,
    )
    assert batch.key != first.key

    again = await a.read([MODEL], 5, None, lanes=["batch"], own_pending=True)
    assert [(d.lane, d.entry_id, d.attempt) for d in again] == [("batch", batch.entry_id, 2)]
    running = [batch.entry_id]
    assert await a.read([MODEL], 5, None, lanes=["batch"], own_pending=True, running=running) == []

    await a.ack(MODEL, batch.entry_id, lane="batch")
    assert await queue.batch_depth(MODEL) == 0
    assert await queue.depth(MODEL) == 1  # the interactive job is untouched


async def test_blocking_read_of_both_lanes_wakes_for_either(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    queue = JobQueue(aredis, keys)
    await queue.enqueue(make_job(), max_depth=10, lane="batch")
    await queue.enqueue(make_job(), max_depth=10)
    both = await a.read([MODEL], count=5, block_ms=100, lanes=["interactive", "batch"])
    assert sorted(d.lane for d in both) == ["batch", "interactive"]


async def test_batch_lane_reclaim_hand_back_and_dead_letter(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    await alive(aredis, keys, "B")
    queue = JobQueue(aredis, keys)
    for _ in range(2):
        await queue.enqueue(make_job(), max_depth=10, lane="batch")
    held = await a.read([MODEL], count=5, block_ms=None, lanes=["batch"])  # A then dies

    assert await b.reclaim(MODEL) == []  # the interactive stream has nothing pending
    claimed = await b.reclaim(MODEL, lane="batch")
    assert [(d.lane, d.entry_id, d.attempt, d.reclaimed) for d in claimed] == [
        ("batch", d.entry_id, 2, True) for d in held
    ]

    # B stops: one line goes back to the group, the next reclaim of a live worker takes it
    await b.hand_back([claimed[0]])
    owners = {
        e["message_id"]: (e["consumer"], e["times_delivered"])
        for e in await aredis.xpending_range(keys.batch_jobs(MODEL), GROUP, "-", "+", 10)
    }
    assert owners == {claimed[0].entry_id: ("handed-back", 2), claimed[1].entry_id: ("B", 2)}
    await alive(aredis, keys, "A")
    (back,) = await a.reclaim(MODEL, lane="batch")
    assert (back.entry_id, back.attempt) == (claimed[0].entry_id, 3)

    await b.dead_letter(claimed[1], "too many deliveries")
    assert await queue.batch_depth(MODEL) == 1
    ((_, fields),) = await aredis.xrange(keys.dead_letters(MODEL))
    assert (fields["lane"], fields["attempts"]) == ("batch", "2")
    assert await aredis.xlen(keys.jobs(MODEL)) == 0
