"""Scenario 12: the Redis primary SIGKILLed under load, behind Sentinel (issue 14).

A primary, a replica and three sentinels (tests/sentinels.py); the API and the workers are
given the Sentinel URL, and the API enqueues durably (a job is acknowledged once the replica
has it). Every request is sent at once, so most wait in the queue and some run when the
primary is killed. The books: every accepted request is answered or ends with an error a
client can retry (counted by code), none waits out its deadline for a job the failover took
(accepted, then silently lost), and a new request is served again within 10 s of the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import httpx
import redis
import redis.asyncio as aioredis

from tokenrelay.queueing.keys import Keys

from ..sentinels import ReplicatedRedis
from ..stack import Stack
from .client import finish, http_client, request
from .ledger import MODEL, Outcome, Summary

PROBE_MODEL = "probe"  # its own worker and queue: a probe measures the service, not the backlog
BACK_WITHIN_S = 10.0  # the bound for "service back"
BACK_GUARD_S = 30.0  # past this it is a failure even on a loaded box


class SentinelStack(Stack):
    """A stack whose processes get the Sentinel URL; the test's own checks go to the
    current primary directly (``follow()`` after a failover)."""

    def __init__(self, replicated: ReplicatedRedis, prefix: str) -> None:
        super().__init__(replicated.primary_url(), prefix, service_url=replicated.url)
        self.replicated = replicated

    def follow(self) -> None:
        self.redis_url = self.replicated.primary_url()


async def sentinel_failover(stack: Stack, *, n: int, size: str, seed: int = 12) -> Summary:
    rng = random.Random(seed)
    s = Summary("sentinel_failover", size)
    started = time.monotonic()
    replicated = ReplicatedRedis().start()
    own = SentinelStack(replicated, stack.prefix)
    try:
        await _run(own, n, s, rng, started)
    finally:
        own.stop()
        replicated.stop()
    return s


async def _run(own: SentinelStack, n: int, s: Summary, rng: random.Random, started: float) -> None:
    # Deadlines far past any failover: a job the failover took shows as deadline_exceeded.
    own.api("--request-timeout", "120", "--max-queue", str(2 * n))  # durable enqueue: auto
    flags = ("--fake-token-delay", "0.02", "--heartbeat-interval", "0.5")
    for _ in range(2):
        own.fake_worker(*flags, "--limit-worker-concurrency", "16")
    own.worker("--engine", "fake", "--model-names", PROBE_MODEL, *flags)
    outcomes = [
        Outcome(i, stream=rng.random() < 0.6, max_tokens=rng.randint(10, 40)) for i in range(n)
    ]
    probes: list[tuple[float, int, str]] = []  # (seconds after the kill, status, error code)
    async with http_client(own, timeout=180) as client:
        load = asyncio.gather(*(request(client, o) for o in outcomes))
        s.notes["queued_at_kill"] = await _queue_deep(own, n // 2)
        old = own.replicated.primary_port()
        own.replicated.server(old).kill()
        killed = time.monotonic()
        s.faults += 1
        latencies: list[float] = []
        probe = asyncio.create_task(_probe(own.url, killed, probes, latencies))
        s.notes["failover_s"] = round(await asyncio.to_thread(own.replicated.wait_failover, old), 1)
        await load
        await probe
    own.follow()
    if latencies:
        s.notes["first_served_probe_s"] = round(latencies[0], 1)  # its own answer time
    await finish(own, outcomes, s, started)
    _judge(s, outcomes, probes)


async def _queue_deep(own: SentinelStack, accepted: int, timeout: float = 60) -> int:
    """Until ``accepted`` jobs were ever queued (XINFO STREAM's entries-added; or the
    timeout): the moment to kill. Returns the jobs queued or running then (XLEN)."""
    r = aioredis.Redis.from_url(own.redis_url, decode_responses=True)
    key = Keys(own.prefix).jobs(MODEL)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with contextlib.suppress(redis.ResponseError):  # no stream yet
                info = await r.xinfo_stream(key)
                if info["entries-added"] >= accepted or time.monotonic() > deadline:
                    return int(info["length"])
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def _probe(
    url: str, killed: float, probes: list[tuple[float, int, str]], latencies: list[float]
) -> None:
    """A short request to the probe model every 0.2 s until one is served after the kill."""
    body = {"model": PROBE_MODEL, "prompt": "probe", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() - killed < 120:
            code, error, sent = 0, "transport", time.monotonic()
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = await client.post("/v1/completions", json=body)
                code, error = r.status_code, ""
                if code != 200:
                    error = r.json()["error"]["code"]
                if code in (429, 503) and not r.headers.get("retry-after"):
                    code = -code  # a refusal without Retry-After: the judge flags it
            probes.append((time.monotonic() - killed, code, error))
            if code == 200:
                latencies.append(time.monotonic() - sent)
            if code == 200:
                return
            await asyncio.sleep(0.2)


def _judge(s: Summary, outcomes: list[Outcome], probes: list[tuple[float, int, str]]) -> None:
    lost = [o for o in outcomes if o.error and o.error.get("code") == "deadline_exceeded"]
    for o in lost:
        s.violations.append(f"request {o.index} ({o.id}): accepted, then lost (deadline)")
    s.lost += len(lost)
    refused = [o for o in outcomes if o.status in (429, 503) and o.error and o not in lost]
    s.notes["refused_by_code"] = dict(
        Counter(str(o.error and o.error.get("code")) for o in refused)
    )
    back = next((t for t, code, _ in probes if code == 200), None)
    s.notes["back_after_s"] = None if back is None else round(back, 1)
    s.notes["probes"] = dict(Counter(f"{code} {error}".strip() for _, code, error in probes))
    if any(code < 0 for _, code, _ in probes):
        s.violations.append("a probe was refused without Retry-After")
    if back is None or back > BACK_GUARD_S:
        s.violations.append(f"no new request served within {BACK_GUARD_S:.0f} s of the kill")
    elif back > BACK_WITHIN_S:
        s.slow.append(f"service back {back:.1f} s after the kill (bound {BACK_WITHIN_S:.0f} s)")
