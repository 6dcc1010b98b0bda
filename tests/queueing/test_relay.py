"""The API's side of the token path against the real Redis: one pub/sub connection,
confirmed subscriptions, in-order delivery, gap repair from the chunk log, attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tokenrelay.queueing.chunks import ChunkPublisher
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import ChoiceDelta, Chunk
from tokenrelay.queueing.relay import ChunkRelay, Subscription

MODEL = "fake"
HANG_GUARD_S = 60.0  # only against a hang: no assertion below is on the machine's speed
NO_QUIET_POLL = 3600.0  # a poll interval past the hang guard: the quiet poll never runs


@pytest.fixture
async def relay(aredis: aioredis.Redis, redis_settings: RedisSettings) -> AsyncIterator[ChunkRelay]:
    r = ChunkRelay(aredis, redis_settings.keys)
    await r.start()
    yield r
    await r.close()


def chunk(rid: str, seq: int, attempt: int = 1, done: bool = False) -> Chunk:
    return Chunk(
        id=rid,
        attempt=attempt,
        seq=seq,
        choices=[ChoiceDelta(index=0, text=f"a{attempt}s{seq} ")],
        done=done,
    )


async def log_only(aredis: aioredis.Redis, keys: Keys, c: Chunk) -> None:
    """What a publish lost to pub/sub looks like: in the log, never on the channel."""
    await aredis.xadd(keys.chunk_log(MODEL, c.id), {"c": c.model_dump_json()})


async def log_and_publish(aredis: aioredis.Redis, keys: Keys, c: Chunk) -> int:
    await log_only(aredis, keys, c)
    return int(await aredis.publish(keys.chunks(MODEL, c.id), c.model_dump_json()))


async def collect(
    sub: Subscription, poll_interval: float = 1.0, out: list[tuple[int, int, str]] | None = None
) -> list[tuple[int, int, str]]:
    """(attempt, seq, text) of every chunk up to the done one, appended to ``out`` as read."""
    out = [] if out is None else out
    async with asyncio.timeout(HANG_GUARD_S):
        async for c in sub.chunks(time.time() + 2 * HANG_GUARD_S, poll_interval=poll_interval):
            out.append((c.attempt, c.seq, "".join(d.text for d in c.choices)))
    return out


async def test_subscribe_returns_only_once_confirmed(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    for i in range(20):
        rid = f"r{i}"
        async with relay.subscribe(MODEL, rid) as sub:
            assert sub.confirmed.is_set()
            # Redis already counts us: a publish right now reaches the subscriber.
            ((_, count),) = await aredis.pubsub_numsub(keys.chunks(MODEL, rid))
            assert count == 1
            assert await log_and_publish(aredis, keys, chunk(rid, 0, done=True)) == 1
            assert await collect(sub) == [(1, 0, "a1s0 ")]
        ((_, count),) = await aredis.pubsub_numsub(keys.chunks(MODEL, rid))
        assert count == 0


async def test_many_requests_share_one_connection(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys

    async def one(i: int) -> list[tuple[int, int, str]]:
        async with relay.subscribe(MODEL, f"c{i}") as sub:
            publisher = ChunkPublisher(aredis, keys, MODEL, f"c{i}")
            for s in range(5):
                await publisher.send([ChoiceDelta(index=0, text=f"{i}.{s} ")], done=s == 4)
            return await collect(sub)

    clients_before = len(await aredis.client_list(_type="pubsub"))
    results = await asyncio.gather(*(one(i) for i in range(30)))
    for i, got in enumerate(results):
        assert [text for _, _, text in got] == [f"{i}.{s} " for s in range(5)]
    assert len(await aredis.client_list(_type="pubsub")) <= max(clients_before, 1)


async def test_chunks_arrive_in_order(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        publisher = ChunkPublisher(aredis, keys, MODEL, "r")
        for s in range(50):
            cancelled = await publisher.send([ChoiceDelta(index=0, text=f"t{s} ")], done=s == 49)
            assert cancelled is False
        got = await collect(sub)
    assert [(a, s) for a, s, _ in got] == [(1, s) for s in range(50)]
    assert "".join(t for *_, t in got) == "".join(f"t{s} " for s in range(50))
    assert await aredis.xlen(keys.chunk_log(MODEL, "r")) == 50
    assert await aredis.ttl(keys.chunk_log(MODEL, "r")) > 0


async def test_a_chunk_dropped_by_pubsub_is_repaired_from_the_log(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        await log_and_publish(aredis, keys, chunk("r", 0))
        await log_only(aredis, keys, chunk("r", 1))  # lost on the way
        await log_only(aredis, keys, chunk("r", 2))  # lost on the way
        await log_and_publish(aredis, keys, chunk("r", 3))
        await log_and_publish(aredis, keys, chunk("r", 4))
        await log_and_publish(aredis, keys, chunk("r", 5, done=True))
        # Repaired at the gap, not by the quiet poll: that never runs here.
        got = await collect(sub, poll_interval=NO_QUIET_POLL)
    assert [s for _, s, _ in got] == [0, 1, 2, 3, 4, 5]  # in order, each exactly once
    assert [t for *_, t in got] == [f"a1s{s} " for s in range(6)]


async def test_a_lost_last_chunk_is_found_by_the_quiet_poll(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        await log_and_publish(aredis, keys, chunk("r", 0))
        await log_only(aredis, keys, chunk("r", 1, done=True))  # no later chunk shows the gap
        got = await collect(sub)
    assert [s for _, s, _ in got] == [0, 1]


async def test_a_quiet_period_reads_the_log(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        for s in range(3):
            await log_only(aredis, keys, chunk("r", s, done=s == 2))  # nothing published
        started = time.monotonic()
        got = await collect(sub, poll_interval=0.5)
        elapsed = time.monotonic() - started
    assert [s for _, s, _ in got] == [0, 1, 2]
    assert elapsed >= 0.45  # read after a quiet spell, not at once (a slow machine only adds)


async def test_log_and_pubsub_copies_are_delivered_once(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """A gap repair reads chunks from the log that pub/sub then delivers too."""
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        got: list[tuple[int, int, str]] = []
        reader = asyncio.create_task(collect(sub, poll_interval=NO_QUIET_POLL, out=got))
        await log_only(aredis, keys, chunk("r", 0))
        await log_and_publish(aredis, keys, chunk("r", 1))  # gap: 0 and 1 come from the log
        async with asyncio.timeout(HANG_GUARD_S):
            while len(got) < 2:
                await asyncio.sleep(0.01)
        await aredis.publish(keys.chunks(MODEL, "r"), chunk("r", 0).model_dump_json())  # late
        await log_and_publish(aredis, keys, chunk("r", 2, done=True))
        await reader
    assert [s for _, s, _ in got] == [0, 1, 2]


async def test_a_newer_attempt_restarts_numbering_and_drops_the_old(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        await log_and_publish(aredis, keys, chunk("r", 0, attempt=1))
        await log_and_publish(aredis, keys, chunk("r", 1, attempt=1))
        # the first worker dies; the job is re-delivered and starts over at seq 0
        await log_and_publish(aredis, keys, chunk("r", 0, attempt=2))
        await log_and_publish(aredis, keys, chunk("r", 2, attempt=1))  # late, from the dead one
        await log_and_publish(aredis, keys, chunk("r", 1, attempt=2))
        await log_and_publish(aredis, keys, chunk("r", 2, attempt=2, done=True))
        got = await collect(sub)
    assert [(a, s) for a, s, _ in got] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


async def test_a_newer_attempt_in_the_log_wins(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """A worker died after logging chunks nobody read; the reclaiming worker's error chunk
    (attempt 2, seq 0) must end the request, not be mistaken for a duplicate."""
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        await log_only(aredis, keys, chunk("r", 0, attempt=1))
        await log_only(aredis, keys, chunk("r", 1, attempt=1))
        await log_only(aredis, keys, chunk("r", 0, attempt=2, done=True))
        got = await collect(sub)
    assert got[-1][:2] == (2, 0)
    assert all(a == 2 for a, _, _ in got)


async def test_a_newer_attempt_after_a_gap_in_the_old_one(
    relay: ChunkRelay, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    async with relay.subscribe(MODEL, "r") as sub:
        await log_and_publish(aredis, keys, chunk("r", 0, attempt=1))
        await log_only(aredis, keys, chunk("r", 1, attempt=1))
        await log_and_publish(aredis, keys, chunk("r", 0, attempt=2))
        await log_and_publish(aredis, keys, chunk("r", 1, attempt=2, done=True))
        got = await collect(sub)
    assert [(a, s) for a, s, _ in got][-2:] == [(2, 0), (2, 1)]
    assert len({(a, s) for a, s, _ in got}) == len(got)


async def test_past_the_deadline_a_timeout_error_ends_the_stream(relay: ChunkRelay) -> None:
    async with relay.subscribe(MODEL, "r") as sub:
        started = time.time()
        got = []
        # Ends at the deadline, not at the next quiet poll: that one would outlast the guard.
        async with asyncio.timeout(HANG_GUARD_S):
            async for c in sub.chunks(started + 0.3, poll_interval=NO_QUIET_POLL):
                got.append(c)
    assert len(got) == 1 and got[0].done and got[0].error is not None
    assert time.time() - started >= 0.29  # not before it, however fast the machine


async def test_publisher_reports_cancellation(
    aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    publisher = ChunkPublisher(aredis, keys, MODEL, "r")
    assert await publisher.send([ChoiceDelta(index=0, text="x")]) is False
    await aredis.set(keys.cancel(MODEL, "r"), 1)
    assert await publisher.send([ChoiceDelta(index=0, text="y")]) is True
    assert publisher.seq == 2


async def test_concurrent_first_subscribes_are_all_confirmed(relay: ChunkRelay) -> None:
    """Regression: redis-py's PubSub opens its connection on its first command, and two
    first subscribes at once each opened one, the second replacing the first, whose
    confirmation was never read (the API's first requests after a start or a reconnect
    waited out the 5 s confirmation timeout, then got a 503)."""

    async def one(i: int) -> None:
        async with relay.subscribe("fake", f"race-{i}", timeout=10):
            pass

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 30)
