"""Fencing against the real Redis: a worker whose job was reclaimed writes nothing for it.

Regression (issue 14): a worker frozen past its heartbeat TTL had its jobs reclaimed, and when
it resumed it could still publish chunks, append to the chunk log, XACK and XDEL entries that
belonged to the new owner.
"""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from tokenrelay.queueing.chunks import ChunkPublisher
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.fencing import LostDelivery, lost
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.messages import ChoiceDelta

from .test_consumer import MODEL, alive, consumers, pending
from .test_jobs import make_job


async def test_a_reclaimed_job_is_fenced_off_its_first_owner(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    a, b = await consumers(aredis, keys, "A", "B")
    job = make_job()
    await JobQueue(aredis, keys).enqueue(job, max_depth=10)
    (mine,) = await a.read([MODEL], count=1, block_ms=100)
    send_a = ChunkPublisher(aredis, keys, MODEL, job.id, fence=a.fence(mine))
    await send_a.send([ChoiceDelta(index=0, text="one ")])  # A owns it: written

    # A freezes; its alive key lapses and B reclaims the job
    await alive(aredis, keys, "B")
    (theirs,) = await b.reclaim(MODEL)
    assert theirs.attempt == 2

    log_before = await aredis.xrange(keys.chunk_log(MODEL, job.id))
    async with aredis.pubsub() as ps:
        await ps.subscribe(keys.chunks(MODEL, job.id))
        await ps.get_message(timeout=1)  # the confirmation
        with pytest.raises(LostDelivery, match=r"reclaimed by B \(delivery 2\)"):
            await send_a.send([ChoiceDelta(index=0, text="two ")])
        assert await ps.get_message(timeout=0.2) is None  # nothing published
    assert await aredis.xrange(keys.chunk_log(MODEL, job.id)) == log_before
    for write in (a.finish(mine), a.dead_letter(mine, "x"), send_a.reset_log()):
        with pytest.raises(LostDelivery):
            await write
    assert await a.hand_back([mine]) == 0
    assert [(p["consumer"], p["times_delivered"]) for p in await pending(aredis, keys)] == [
        ("B", 2)
    ]
    assert await aredis.xlen(keys.dead_letters(MODEL)) == 0
    assert [e.reason for e in await lost(aredis, [a.fence(mine), b.fence(theirs)])] == [
        "reclaimed by B (delivery 2)"
    ]

    # B's writes land, and once B acks it the entry is no longer anyone's
    send_b = ChunkPublisher(aredis, keys, MODEL, job.id, fence=b.fence(theirs), seq=1)
    assert await send_b.send([ChoiceDelta(index=0, text="two ")]) is False
    await b.finish(theirs)
    assert await pending(aredis, keys) == []
    (gone,) = await lost(aredis, [b.fence(theirs)])
    assert gone.reason.startswith("no longer pending")
    log = await aredis.xrange(keys.chunk_log(MODEL, job.id))
    assert [f["d"] for _, f in log] == ["1", "2"]


async def test_a_re_read_delivery_fences_the_earlier_one_of_the_same_worker(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """The delivery count, not only the consumer: a job a worker re-reads from its own
    pending list (after a Redis error) fences out its own task still holding delivery 1."""
    keys = redis_settings.keys
    (a,) = await consumers(aredis, keys, "A")
    await JobQueue(aredis, keys).enqueue(make_job(), max_depth=10)
    (first,) = await a.read([MODEL], count=1, block_ms=100)
    (again,) = await a.read([MODEL], count=1, block_ms=100, own_pending=True)
    assert again.attempt == 2
    with pytest.raises(LostDelivery, match=r"reclaimed by A \(delivery 2\)"):
        await a.finish(first)
    await a.finish(again)
    assert await pending(aredis, keys) == []
