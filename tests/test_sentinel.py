"""Replicated Redis with Sentinel (issue 14): the URL, clients that follow a failover, and
durable enqueue (a job acknowledged only once a replica has it).

Real processes: a primary, a replica and three sentinels (tests/sentinels.py); the API and
fake workers are real `tokenrelay` processes. The failover under load is the fault scenario
`sentinel_failover` (tests/faults/scenarios_sentinel.py): small in the default suite through
tests/faults/test_faults.py, 500 requests here with --runslow.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tokenrelay.api.errors import APIError
from tokenrelay.api.service import GenerationService
from tokenrelay.api.settings import APISettings
from tokenrelay.queueing import sentinel
from tokenrelay.queueing.batch_queue import sync_connect
from tokenrelay.queueing.connection import RedisSettings, connect
from tokenrelay.queueing.durability import Durability, NotReplicated
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.queueing.relay import ChunkRelay

from .faults.scenarios_sentinel import SentinelStack, sentinel_failover
from .sentinels import ReplicatedRedis
from .stack import Stack

HANG_GUARD_S = 60.0  # against a hang only: nothing here asserts the machine's speed


@pytest.fixture
def replicated() -> Iterator[ReplicatedRedis]:
    rr = ReplicatedRedis().start()
    yield rr
    rr.stop()


def _job(model: str = "fake") -> Job:
    return Job(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        kind="completion",
        prompt="hello",
        params=SamplingParams(max_tokens=4),
        stream=False,
        created=int(time.time()),
        deadline=time.time() + 60,
    )


# ---------------------------------------------------------------------------------------------
# The URL


def test_parse_names_sentinels_master_db_and_passwords() -> None:
    url = "redis+sentinel://u:p%40ss@10.0.0.1:26380,10.0.0.2,[::1]:7000/mymaster/3"
    target = sentinel.parse(url + "?sentinel_password=s3")
    assert target.sentinels == (("10.0.0.1", 26380), ("10.0.0.2", 26379), ("::1", 7000))
    assert (target.master, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("u", "p@ss")
    assert target.sentinel_password == "s3"
    assert "p@ss" not in target.describe() and "s3" not in target.describe()


def test_parse_defaults_and_requirepass_alone() -> None:
    target = sentinel.parse("redis+sentinel://:secret@h1:26379/m")
    assert (target.db, target.username, target.password) == (0, None, "secret")
    assert sentinel.parse("redis+sentinel://secret@h1/m").password == "secret"
    assert sentinel.is_sentinel("redis+sentinel://h/m")
    assert not sentinel.is_sentinel("redis://h:6379/0")


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://h1:26379",  # no master name
        "redis+sentinel://h1:26379/m/x",  # db not a number
        "redis+sentinel://h1:port/m",
        "redis+sentinel:///m",  # no sentinel
        "redis+sentinel://h1/m/0/extra",
        "redis+sentinel://h1/m?ssl=1",  # unknown parameter
    ],
)
def test_parse_refuses_malformed_urls(url: str) -> None:
    with pytest.raises(ValueError):
        sentinel.parse(url)


# ---------------------------------------------------------------------------------------------
# Clients follow a failover


async def test_clients_follow_a_failover(replicated: ReplicatedRedis) -> None:
    """The asyncio pool, a pub/sub connection and RQ's synchronous client all reach the new
    primary after the old one is SIGKILLed, with no help."""
    settings = RedisSettings(url=replicated.url, prefix="tf")
    client, sync = connect(settings), sync_connect(settings)
    pubsub = client.pubsub()
    try:
        await client.set("before", 1)
        await pubsub.subscribe("ch")
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        old = replicated.primary_port()
        replicated.server(old).kill()
        await asyncio.to_thread(replicated.wait_failover, old)
        assert await _eventually(lambda: client.get("before")) == "1"  # it was replicated
        assert await _eventually(lambda: asyncio.to_thread(sync.set, "sync", 1))
        # The pub/sub connection re-subscribes on its next read, on the new primary.
        got = None
        deadline = time.monotonic() + HANG_GUARD_S
        while got is None and time.monotonic() < deadline:
            try:
                message = await pubsub.get_message(timeout=0.5)
            except redis.ConnectionError:
                await asyncio.sleep(0.2)
                continue
            await client.publish("ch", "after")
            if message and message["type"] == "message":
                got = message["data"]
        assert got == "after"
    finally:
        await pubsub.aclose()
        await client.aclose()
        sync.close()


async def _eventually(call, timeout: float = HANG_GUARD_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# Durable enqueue


async def test_enqueue_returns_once_the_replica_has_the_job(replicated: ReplicatedRedis) -> None:
    client = connect(RedisSettings(url=replicated.url))
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    queue = JobQueue(client, keys, durability=Durability(client, "auto", 500))
    replica = redis.Redis(port=replicated.replicas[0].port, decode_responses=True)
    try:
        job = _job()
        result = await queue.enqueue(job, max_depth=100)
        assert result.status == "ok"
        # Acknowledged means on the replica already, not soon.
        assert replica.xlen(keys.jobs("fake")) == 1
        again = await queue.enqueue(job, max_depth=100)  # idempotent, and durable too
        assert (again.status, again.detail) == ("dup", result.detail)
    finally:
        await client.aclose()
        replica.close()


async def test_enqueue_refuses_when_no_replica_confirms(replicated: ReplicatedRedis) -> None:
    """A replica frozen (SIGSTOP) still counts as connected for the primary, so auto waits
    for it: the enqueue fails with NotReplicated after the timeout, never succeeds silently."""
    client = connect(RedisSettings(url=replicated.url))
    queue = JobQueue(client, Keys("tn"), durability=Durability(client, "auto", 300))
    pid = replicated.replicas[0].process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(NotReplicated):
            await queue.enqueue(_job(), max_depth=100)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        assert (await queue.enqueue(_job(), max_depth=100)).status == "ok"
    finally:
        await client.aclose()


async def test_durability_modes_without_a_replica(aredis) -> None:  # type: ignore[no-untyped-def]
    """The session's Redis has no replica: auto enqueues at once, on refuses, off never
    waits."""
    keys = Keys(f"t{uuid.uuid4().hex[:8]}")
    auto = JobQueue(aredis, keys, durability=Durability(aredis, "auto", 2000))
    t0 = time.monotonic()
    assert (await auto.enqueue(_job(), max_depth=10)).status == "ok"
    assert time.monotonic() - t0 < 1.5  # did not sit out a 2 s WAIT
    assert not await auto.durability.required()  # type: ignore[union-attr]
    on = JobQueue(aredis, keys, durability=Durability(aredis, "on", 50))
    with pytest.raises(NotReplicated):
        await on.enqueue(_job(), max_depth=10)
    off = JobQueue(aredis, keys, durability=Durability(aredis, "off", 50))
    assert (await off.enqueue(_job(), max_depth=10)).status == "ok"


async def test_not_replicated_cancels_a_request_but_keeps_a_batch_line(
    replicated: ReplicatedRedis,
) -> None:
    """An interactive request refused for want of a replica has its job cancelled (its
    client retries as a new request); a batch line keeps it, and its retry with the same id
    is acknowledged once the replica has the first XADD."""
    settings = APISettings(
        redis=RedisSettings(url=replicated.url, prefix=f"t{uuid.uuid4().hex[:8]}"),
        durable_enqueue_timeout_ms=300,
    )
    keys = settings.redis.keys
    client = connect(settings.redis)
    relay = ChunkRelay(client, keys)
    await relay.start()
    service = GenerationService(client, relay, settings)
    pid = replicated.replicas[0].process.pid  # type: ignore[union-attr]
    jobs = {"interactive": _job(), "batch": _job()}
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            for lane, job in jobs.items():
                with pytest.raises(APIError) as refused:
                    async with service.generate(job, lane=lane):  # type: ignore[arg-type]
                        pass
                assert (refused.value.status, refused.value.code) == (
                    503,
                    "enqueue_not_replicated",
                )
                assert refused.value.retry_after
                cancelled = await client.exists(keys.cancel("fake", job.id))
                assert cancelled == (lane == "interactive")
        finally:
            os.kill(pid, signal.SIGCONT)
        queue = service.queue
        again = await queue.enqueue(jobs["batch"], max_depth=100, lane="batch")
        assert again.status == "dup"
    finally:
        await relay.close()
        await client.aclose()


def test_api_answers_503_with_retry_after_when_no_replica_confirms(
    replicated: ReplicatedRedis,
) -> None:
    """Through a real API on the Sentinel URL: with the replica frozen, a request is a 503
    `enqueue_not_replicated` with Retry-After (OpenAI's error shape), and its job is
    cancelled, so no worker answers nobody; thawed, the same API serves again."""
    stack = SentinelStack(replicated, f"t{uuid.uuid4().hex[:8]}")
    try:
        stack.api("--durable-enqueue-timeout", "300")
        stack.fake_worker()
        body = {"model": "fake", "prompt": "hi", "max_tokens": 3}
        assert httpx.post(stack.url + "/v1/completions", json=body, timeout=30).status_code == 200
        pid = replicated.replicas[0].process.pid  # type: ignore[union-attr]
        os.kill(pid, signal.SIGSTOP)
        try:
            r = httpx.post(stack.url + "/v1/completions", json=body, timeout=30)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"]
        error = r.json()["error"]
        assert error["code"] == "enqueue_not_replicated"
        assert set(error) == {"message", "type", "param", "code"}
        r = httpx.post(stack.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        stack.stop()


def test_sentinel_url_in_status_and_worker(replicated: ReplicatedRedis) -> None:
    """`tokenrelay status` and a worker take the Sentinel URL like the API."""
    import subprocess

    from tokenrelay.commands import tokenrelay_argv

    stack = SentinelStack(replicated, f"t{uuid.uuid4().hex[:8]}")
    try:
        stack.fake_worker()
        out = subprocess.run(
            [
                *tokenrelay_argv(),
                "status",
                "--redis-url",
                replicated.url,
                "--key-prefix",
                stack.prefix,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert '"fake"' in out.stdout
    finally:
        stack.stop()


# ---------------------------------------------------------------------------------------------
# The failover under load, full size


@pytest.mark.slow
async def test_failover_under_500_requests(stack: Stack) -> None:
    summary = await sentinel_failover(stack, n=500, size="full")
    summary.write()
    print(summary.line())
    print(*(f"slow: {v}" for v in summary.slow), sep="\n")
    assert not summary.violations, "\n".join(summary.violations[:20])
    assert summary.lost == 0 and summary.duplicated == 0
