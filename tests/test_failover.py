"""Failover with real processes: a worker killed mid-load loses nothing that was accepted.

Two fake workers of model "fake" serve one API. One is SIGKILLed while both run jobs and
more wait in the queue. Its jobs stay pending until its heartbeat key expires (4 s), then
the survivor reclaims them. Non-streaming requests must still get their exact text; a stream
that had tokens from the dead worker ends with an error event and [DONE]; every other
stream completes intact. Also: jobs that crash every worker are dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.consumer import JobConsumer
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import GROUP, Keys
from tokenrelay.queueing.messages import Chunk, Job, SamplingParams
from tokenrelay.queueing.relay import ChunkRelay
from tokenrelay.workers.fake_engine import FakeEngine, fake_text
from tokenrelay.workers.worker import Worker, WorkerOptions

from .stack import Stack

MODEL = "fake"
T = TypeVar("T")
TOKENS = 30  # x 0.05 s a token: 1.5 s a job
HANG_GUARD_S = 60.0  # only against a hang: nothing below asserts the machine's speed


@dataclass
class Outcome:
    """What one client saw."""

    stream: bool
    status: int = 0
    id: str = ""
    content: str = ""
    tokens: int = 0
    error: dict | None = None
    done: bool = False
    after_done: int = 0  # events after [DONE] (there must be none)
    finished_at: float = 0.0  # time.monotonic() when the answer or the error was in


async def run_request(client: httpx.AsyncClient, body: dict, out: Outcome) -> None:
    try:
        await _run_request(client, body, out)
    finally:
        out.finished_at = out.finished_at or time.monotonic()


async def _run_request(client: httpx.AsyncClient, body: dict, out: Outcome) -> None:
    if not out.stream:
        r = await client.post("/v1/completions", json=body)
        out.status = r.status_code
        data = r.json()
        if r.status_code == 200:
            out.id, out.content = data["id"], data["choices"][0]["text"]
        else:
            out.error = data["error"]
        return
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = json.loads(await r.aread())["error"]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if out.done:
                out.after_done += 1
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                out.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                out.error = event["error"]
                out.finished_at = time.monotonic()
                continue
            out.id = event["id"]
            for choice in event["choices"]:
                if text := choice["delta"].get("content"):
                    out.content += text
                    out.tokens += 1


def body_for(stream: bool, prompt: str = "hello", tokens: int = TOKENS) -> dict:
    if stream:
        return {
            "model": MODEL,
            "stream": True,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    return {"model": MODEL, "prompt": prompt, "max_tokens": tokens}


async def wait_for(
    predicate: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def pending_by_consumer(aredis: aioredis.Redis, keys: Keys) -> dict[str, list[str]]:
    """Job (request) ids each consumer holds unacked."""
    rows = await aredis.xpending_range(keys.jobs(MODEL), GROUP, "-", "+", 1000)
    entries = dict(await aredis.xrange(keys.jobs(MODEL)))
    out: dict[str, list[str]] = {}
    for row in rows:
        fields = entries.get(row["message_id"])
        if fields:
            out.setdefault(row["consumer"], []).append(Job.model_validate_json(fields["job"]).id)
    return out


async def worker_ids(aredis: aioredis.Redis, keys: Keys) -> dict[int, str]:
    """pid -> worker id, from the registry."""
    ids = await aredis.smembers(keys.workers)
    out = {}
    for wid in ids:
        raw = await aredis.get(keys.worker(wid))
        if raw:
            out[json.loads(raw)["pid"]] = wid
    return out


async def assert_queue_empty(
    aredis: aioredis.Redis, keys: Keys, timeout: float = HANG_GUARD_S
) -> None:
    async def empty() -> bool:
        summary = await aredis.xpending(keys.jobs(MODEL), GROUP)
        return await aredis.xlen(keys.jobs(MODEL)) == 0 and summary["pending"] == 0

    await wait_for(empty, timeout, "an empty job stream and no pending entries")


async def test_killed_worker_loses_nothing(
    stack: Stack, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    keys = redis_settings.keys
    stack.api()
    flags = ("--fake-token-delay", "0.05", "--limit-worker-concurrency", "2")
    workers = [stack.fake_worker(*flags), stack.fake_worker(*flags)]
    by_pid = await worker_ids(aredis, keys)
    wid = {p.popen.pid: by_pid[p.popen.pid] for p in workers}

    # Wave 1 fills all four slots (each worker takes two); wave 2 queues behind them.
    wave1 = [Outcome(stream=i % 2 == 0) for i in range(4)]
    wave2 = [Outcome(stream=i % 2 == 0) for i in range(8)]
    async with httpx.AsyncClient(base_url=stack.url, timeout=40) as client:
        tasks = [asyncio.create_task(run_request(client, body_for(o.stream), o)) for o in wave1]

        async def both_busy() -> dict[str, list[str]] | None:
            held = await pending_by_consumer(aredis, keys)
            if sorted(len(held.get(w, [])) for w in wid.values()) != [2, 2]:
                return None
            for rid in (r for ids in held.values() for r in ids):
                if await aredis.xlen(keys.chunk_log(MODEL, rid)) < 3:
                    return None  # not every job has sent tokens yet
            return held

        # (a) both workers take jobs
        held = await wait_for(both_busy, HANG_GUARD_S, "both workers running two jobs each")
        tasks += [asyncio.create_task(run_request(client, body_for(o.stream), o)) for o in wave2]

        async def accepted() -> bool:
            return await _xlen_at_least(aredis, keys.jobs(MODEL), 12)

        await wait_for(accepted, HANG_GUARD_S, "12 accepted jobs")

        victim, survivor = workers
        lost = set(held[wid[victim.popen.pid]])  # request ids the dead worker was running
        streams_with_tokens = {o.id for o in wave1 if o.stream and o.tokens > 0}
        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()

        async with asyncio.timeout(HANG_GUARD_S):
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - killed_at

    outcomes = wave1 + wave2
    for o in outcomes:
        assert o.status == 200, o
        assert o.after_done == 0, o
        if not o.stream:
            assert o.error is None, o
            assert o.content == fake_text(o.id, TOKENS), o
            continue
        assert o.done, o
        # a stream that had tokens from the dead worker is continued by the survivor
        # (issue 14; it used to end with worker_lost): the client sees one whole text
        assert o.error is None, o
        assert o.content == fake_text(o.id, TOKENS), o
    # every request id is distinct: no request was answered with another's tokens
    assert len({o.id for o in outcomes}) == len(outcomes)
    # the lost jobs came back only after the heartbeat expired (how much later is speed)
    assert elapsed >= 4
    # nor did they wait behind the whole queue: the survivor takes them at its first free
    # slot after the heartbeat expired, before the requests queued after them
    last_queued = max(o.finished_at for o in wave2)
    assert len(lost) == 2
    for o in outcomes:
        if o.id in lost:
            assert o.finished_at < last_queued, (o, last_queued - killed_at)
    assert "reclaimed job" in survivor.output()
    continued = [o.id for o in wave1 if o.id in lost and o.id in streams_with_tokens]
    assert survivor.output().count("continues after") >= len(continued)
    await assert_queue_empty(aredis, keys)
    assert await aredis.xlen(keys.dead_letters(MODEL)) == 0
    assert survivor.alive()


async def _xlen_at_least(aredis: aioredis.Redis, key: str, n: int) -> bool:
    return await aredis.xlen(key) >= n


async def test_job_that_kills_every_worker_is_dead_lettered(
    stack: Stack, aredis: aioredis.Redis, redis_settings: RedisSettings
) -> None:
    """CRASH kills whichever worker takes it. With --max-deliveries 2 the job crashes two
    workers; the third delivery goes to the dead-letter stream and the client gets a 500."""
    keys = redis_settings.keys
    stack.api()
    flags = ("--max-deliveries", "2", "--heartbeat-interval", "0.2", "--heartbeat-ttl", "1")
    first = [stack.fake_worker(*flags), stack.fake_worker(*flags)]

    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        poisoned = Outcome(stream=False)
        task = asyncio.create_task(run_request(client, body_for(False, "please CRASH"), poisoned))

        async def all_dead() -> bool:
            return not any(p.alive() for p in first)

        await wait_for(all_dead, HANG_GUARD_S, "both workers to crash on the job")
        assert not task.done()  # nothing answered yet: the job is still pending
        assert all(p.popen.returncode == 17 for p in first)

        replacement = stack.fake_worker(*flags)
        async with asyncio.timeout(HANG_GUARD_S):
            await task
        assert poisoned.status == 500, poisoned
        assert poisoned.error is not None and poisoned.error["code"] == "dead_lettered"

        # the new worker survived and serves normal requests
        ok = Outcome(stream=False)
        await run_request(client, body_for(False, tokens=5), ok)
        assert ok.status == 200 and ok.content == fake_text(ok.id, 5)

    assert replacement.alive()
    await assert_queue_empty(aredis, keys)
    ((_, fields),) = await aredis.xrange(keys.dead_letters(MODEL))
    assert "CRASH" in Job.model_validate_json(fields["job"]).prompt
    assert fields["attempts"] == "3"


async def test_engine_error_is_reported_and_the_worker_lives_on(stack: Stack) -> None:
    stack.api()
    worker = stack.fake_worker()
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for stream in (False, True):
            bad = Outcome(stream=stream)
            await run_request(client, body_for(stream, "POISON"), bad)
            assert bad.status == 500 and bad.error["code"] == "engine_error", bad
            ok = Outcome(stream=stream)
            await run_request(client, body_for(stream, tokens=4), ok)
            assert ok.status == 200 and ok.content == fake_text(ok.id, 4), ok
    assert worker.alive()


def _job(prompt: str = "hi", stream: bool = False) -> Job:
    return Job(
        id=f"cmpl-dl-{time.monotonic_ns()}",
        model=MODEL,
        kind="completion",
        prompt=prompt,
        params=SamplingParams(max_tokens=3),
        stream=stream,
        created=int(time.time()),
        deadline=time.time() + 2 * HANG_GUARD_S,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_worker_dead_letters_past_max_deliveries(
    aredis: aioredis.Redis, redis_settings: RedisSettings, stream: bool
) -> None:
    """The same rule in-process: a pending job of a dead worker already delivered
    max_deliveries times is dead-lettered on reclaim, and its client gets an error chunk."""
    keys = redis_settings.keys
    job = _job(stream=stream)
    relay = ChunkRelay(aredis, keys)
    await relay.start()
    worker = Worker(
        aredis,
        keys,
        FakeEngine(),
        WorkerOptions(models=[MODEL], heartbeat_interval=0.1, max_deliveries=2),
    )
    try:
        async with relay.subscribe(MODEL, job.id) as sub:
            dead = JobConsumer(aredis, keys, "dead-worker")
            await dead.ensure_groups([MODEL])
            await JobQueue(aredis, keys).enqueue(job, max_depth=10)
            (delivery,) = await dead.read([MODEL], 1, 100)  # delivery 1, then it died...
            await aredis.xclaim(
                keys.jobs(MODEL), GROUP, "dead-worker", 0, [delivery.entry_id], retrycount=2
            )  # ...and so did the one that reclaimed it: 2 deliveries so far
            running = asyncio.create_task(worker.run())
            chunks = []
            async with asyncio.timeout(HANG_GUARD_S):
                async for chunk in sub.chunks(job.deadline):
                    chunks.append(chunk)
        (only,) = chunks
        assert only.attempt == 3 and only.done
        assert only.error is not None and only.error.code == "dead_lettered"
        assert not only.choices
        await assert_queue_empty(aredis, keys)
        ((_, fields),) = await aredis.xrange(keys.dead_letters(MODEL))
        assert Job.model_validate_json(fields["job"]) == job
        assert fields["reason"] == "too many deliveries"
    finally:
        worker.stop()
        if "running" in locals():
            async with asyncio.timeout(HANG_GUARD_S):
                await running
        await relay.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_rerun_after_redis_error_is_a_new_attempt(
    aredis: aioredis.Redis, redis_settings: RedisSettings, stream: bool
) -> None:
    """Bug: a job whose task ended on a Redis error stayed pending and was re-read from the
    worker's own pending list as attempt 1 again. Its chunks restarted at seq 0 under the
    same attempt, the API dropped them as duplicates and appended the rerun's later chunks
    (two answers spliced when sampling), and the first run's chunk log was kept.

    Now the rerun is a re-delivery: a stream that already had tokens is continued after
    them (issue 14; it used to end with worker_lost), under the run's attempt and numbered
    on; otherwise the log is reset and the rerun (attempt 2) answers from scratch."""
    keys = redis_settings.keys
    job = _job(stream=stream).model_copy(update={"params": SamplingParams(max_tokens=6)})
    relay = ChunkRelay(aredis, keys)
    await relay.start()
    worker = Worker(
        aredis,
        keys,
        FakeEngine(token_delay=0.05),
        WorkerOptions(models=[MODEL], heartbeat_interval=0.1, chunk_interval=0.01),
    )
    # The job's second round of chunks fails on Redis once (its first is out by then).
    log_key, rounds = keys.chunk_log(MODEL, job.id), 0
    send = worker.outbox.send

    async def flaky_send(commands: list, *, urgent: bool) -> list:
        nonlocal rounds
        if log_key in commands[0]:  # the job's fenced chunk script
            rounds += 1
            if rounds == 2:
                raise RedisConnectionError("injected: connection lost")
        return await send(commands, urgent=urgent)

    worker.outbox.send = flaky_send  # type: ignore[method-assign]
    try:
        async with relay.subscribe(MODEL, job.id) as sub:
            await JobQueue(aredis, keys).enqueue(job, max_depth=10)
            running = asyncio.create_task(worker.run())
            chunks = []
            async with asyncio.timeout(HANG_GUARD_S):
                async for chunk in sub.chunks(job.deadline):
                    chunks.append(chunk)
        assert rounds > 2  # it failed once and ran again
        first, *rest = chunks
        assert (first.attempt, first.seq, first.error) == (1, 0, None)
        assert first.choices and first.choices[0].text.startswith("t0.")
        last = rest[-1]
        assert last.done and last.error is None
        logged = [
            (Chunk.model_validate_json(f["c"]), f["d"]) for _, f in await aredis.xrange(log_key)
        ]
        if stream:
            # tokens were out: the rerun goes on after them, one run, numbered on
            assert all(c.attempt == 1 for c in rest), chunks
            assert [c.seq for c in chunks] == list(range(len(chunks)))
            text = "".join(ch.text for c in chunks for ch in c.choices)
            assert text == fake_text(job.id, 6)
            assert [(c.seq, d) for c, d in logged] == [(0, "1")] + [(c.seq, "2") for c in rest]
        else:
            assert all(c.attempt == 2 for c in rest), chunks
            assert [c.seq for c in rest] == list(range(len(rest)))
            assert last.error is None
            text = "".join(ch.text for c in rest for ch in c.choices)
            assert text == fake_text(job.id, 6)
            # the first run's chunks are gone from the log: only the rerun's, each once
            assert [(c.attempt, c.seq) for c, _ in logged] == [(2, c.seq) for c in rest]
        await assert_queue_empty(aredis, keys)
        assert await aredis.xlen(keys.dead_letters(MODEL)) == 0
    finally:
        worker.stop()
        if "running" in locals():
            async with asyncio.timeout(HANG_GUARD_S):
                await running
        await relay.close()
