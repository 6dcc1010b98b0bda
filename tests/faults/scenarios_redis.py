"""Scenarios 5 and 6: Redis killed and restarted (AOF everysec), connection blips."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx
import redis.asyncio as aioredis

from tokenrelay.embedded_redis import EmbeddedRedis

from ..stack import Stack
from .client import bounded, finish, http_client, request
from .ledger import MODEL, Outcome, Summary, p99

# ---------------------------------------------------------------------------------------------
# 5. Redis SIGKILLed and restarted on the same port


async def _probe(url: str, until: asyncio.Event, latencies: list[float], codes: list[int]) -> None:
    """While Redis is down: every request must be answered (503) at once, not hang."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not until.is_set():
            t0 = time.monotonic()
            try:
                r = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "probe", "max_tokens": 2}
                )
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            # Every probe's latency counts (a hang must show), but only the status of one
            # answered while Redis was still down: one sent just before the restart may be
            # answered, rightly, with a 200 once Redis is back.
            latencies.append(time.monotonic() - t0)
            if not until.is_set():
                codes.append(code)
            await asyncio.sleep(0.1)


async def redis_restart(stack: Stack, *, n: int, size: str, seed: int = 5) -> Summary:
    """Its own Redis with appendonly yes / appendfsync everysec. Under load, Redis is
    SIGKILLed, kept down 3 s, and restarted on the same port from its AOF. Requests have a
    15 s deadline: one whose job or chunks were in the last unsynced second must end with an
    error by then, never hang."""
    rng = random.Random(seed)
    s = Summary("redis_restart", size)
    started = time.monotonic()
    server = EmbeddedRedis(appendonly=True).start()
    own = Stack(server.url, stack.prefix)
    try:
        own.api("--request-timeout", "15")
        flags = ("--fake-token-delay", "0.02", "--heartbeat-interval", "0.5")
        for _ in range(2):
            own.fake_worker(*flags)
        outages = max(1, n // 100)
        outcomes = [
            Outcome(i, stream=rng.random() < 0.6, max_tokens=rng.randint(10, 60)) for i in range(n)
        ]
        probe_lat: list[float] = []
        probe_codes: list[int] = []

        async def killer() -> None:
            for _ in range(outages):
                await asyncio.sleep(rng.uniform(1.0, 2.0))
                await asyncio.to_thread(server.kill)
                s.faults += 1
                up = asyncio.Event()
                probe = asyncio.create_task(_probe(own.url, up, probe_lat, probe_codes))
                await asyncio.sleep(3.0)
                up.set()  # before the restart: from here on a probe may rightly get a 200
                await asyncio.to_thread(server.start)
                await probe

        async with http_client(own, timeout=60) as client:
            kill = asyncio.create_task(killer())
            await bounded([request(client, o) for o in outcomes], concurrency=16)
            await kill
        await _recovered(own, s)
        await finish(own, outcomes, s, started)
    finally:
        own.stop()
        server.stop()
    s.notes["down_probes"] = len(probe_codes)
    s.notes["down_probe_codes"] = sorted(set(probe_codes))
    s.notes["p99_down_answer_s"] = round(p99(probe_lat) or 0, 3)
    s.notes["deadline_errors"] = sum(
        bool(o.error and o.error.get("code") == "deadline_exceeded") for o in outcomes
    )
    if set(probe_codes) - {503}:
        s.violations.append(f"while Redis was down the API answered {sorted(set(probe_codes))}")
    if (p99(probe_lat) or 0) > 6:
        s.slow.append(f"p99 answer while Redis was down {p99(probe_lat):.1f}s")
    if s.max_latency_s > 15 + 5:
        s.slow.append(f"a request took {s.max_latency_s:.1f}s, past its 15 s deadline")
    return s


async def _recovered(stack: Stack, s: Summary, timeout: float = 120) -> None:
    """After the restart the same processes serve again, with no help."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 3}
                )
                if r.status_code == 200:
                    s.notes["recovered_after_s"] = round(timeout - (deadline - time.monotonic()), 1)
                    return
            await asyncio.sleep(0.2)
    s.violations.append(f"no request served {timeout:.0f}s after Redis came back")


# ---------------------------------------------------------------------------------------------
# 6. Connection blips: CLIENT KILL and CLIENT PAUSE while jobs are enqueued and read


async def redis_blips(stack: Stack, *, n: int, size: str, seed: int = 6) -> Summary:
    """Every ~0.3 s either every client connection is killed (CLIENT KILL TYPE normal, and
    TYPE pubsub) or Redis pauses all clients for 200-700 ms (CLIENT PAUSE). Enqueue is
    retried (idempotent by request id); a worker whose Redis call failed re-reads its own
    pending job as a new attempt. No chunk may be logged twice in one attempt (a job that
    ran twice at once), nothing stranded, every client answered."""
    rng = random.Random(seed)
    s = Summary("blips", size)
    started = time.monotonic()
    server = EmbeddedRedis().start()  # CLIENT KILL hits every client of the server
    try:
        return await _blips(Stack(server.url, stack.prefix), n, s, rng, started)
    finally:
        server.stop()


async def _blips(stack: Stack, n: int, s: Summary, rng: random.Random, started: float) -> Summary:
    stack.api()
    for _ in range(2):
        stack.fake_worker("--fake-token-delay", "0.01")
    outcomes = [
        Outcome(i, stream=rng.random() < 0.6, max_tokens=rng.randint(10, 40)) for i in range(n)
    ]
    stop = asyncio.Event()
    kinds: dict[str, int] = {"kill": 0, "pause": 0}

    async def blipper() -> None:
        admin = aioredis.Redis.from_url(stack.redis_url, decode_responses=True)
        try:
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.15, 0.45))
                if rng.random() < 0.5:
                    for kind in ("normal", "pubsub"):
                        await admin.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
                    kinds["kill"] += 1
                else:
                    await admin.execute_command("CLIENT", "PAUSE", rng.randint(200, 700), "ALL")
                    kinds["pause"] += 1
                s.faults += 1
        finally:
            with contextlib.suppress(Exception):
                await admin.execute_command("CLIENT", "UNPAUSE")
            await admin.aclose()

    try:
        async with http_client(stack, timeout=60) as client:
            blips = asyncio.create_task(blipper())
            await bounded([request(client, o) for o in outcomes], concurrency=16)
            stop.set()
            await blips
        await finish(stack, outcomes, s, started)
    finally:
        stack.stop()
    s.notes.update(kinds)
    return s
