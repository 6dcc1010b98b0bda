"""Scenarios 7, 8 and 10: a poison job, long generations and heartbeats, rolling restarts."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import httpx

from tokenrelay.queueing.keys import GROUP, Keys

from ..stack import Process, Stack
from .client import bounded, finish, http_client, redis_client, request
from .ledger import MODEL, Outcome, Summary

# ---------------------------------------------------------------------------------------------
# 7. A poison job: the fake engine raises on a prompt containing POISON


async def poison_job(stack: Stack, *, n: int, size: str, seed: int = 7) -> Summary:
    """Every 10th request is poison. It must run --max-deliveries (3) times, land in the
    dead-letter stream with its attempt count, and give its client a 500 engine_error; the
    other requests, on the same workers at the same time, complete untouched."""
    rng = random.Random(seed)
    s = Summary("poison", size)
    started = time.monotonic()
    stack.api()
    for _ in range(2):
        stack.fake_worker("--fake-token-delay", "0.01", "--max-deliveries", "3")
    outcomes = [
        Outcome(
            i,
            stream=rng.random() < 0.5,
            max_tokens=rng.randint(10, 40),
            marker=" POISON" if i % 10 == 3 else "",
        )
        for i in range(n)
    ]
    async with http_client(stack, timeout=60) as client:
        await bounded([request(client, o) for o in outcomes], concurrency=16)
    await finish(stack, outcomes, s, started)
    poisoned = [o for o in outcomes if o.marker]
    s.faults = len(poisoned)
    for o in poisoned:
        if o.status != 500 or not o.error or o.error.get("code") != "engine_error":
            s.violations.append(f"poison request {o.index}: {o.status} {o.error}")
    r = redis_client(stack)
    try:
        dead = await r.xrange(Keys(stack.prefix).dead_letters(MODEL))
    finally:
        await r.aclose()
    s.dead_lettered = len(dead)
    attempts = sorted({fields["attempts"] for _, fields in dead})
    s.notes["dead_letter_attempts"] = attempts
    if s.dead_lettered != len(poisoned) or attempts != ["3"]:
        s.violations.append(f"{s.dead_lettered} dead letters with attempts {attempts}")
    if s.completed != n - len(poisoned):
        s.violations.append(f"only {s.completed} of {n - len(poisoned)} good requests completed")
    return s


# ---------------------------------------------------------------------------------------------
# 8. Generations longer than three heartbeat intervals


LONG = ("--fake-token-delay", "0.02", "--heartbeat-interval", "0.25", "--heartbeat-ttl", "1.0")


async def long_generation(stack: Stack, *, n: int, size: str, seed: int = 8) -> Summary:
    """Each job runs 150 tokens x 20 ms = 3 s: twelve heartbeat intervals, three heartbeat
    TTLs. Phase 1: two live workers; no job may be re-delivered. Phase 2: one worker takes
    every job, then dies mid-generation; a second worker must reclaim each exactly once."""
    s = Summary("long", size)
    started = time.monotonic()
    stack.api()
    first = stack.fake_worker(*LONG, "--limit-worker-concurrency", str(n))
    stack.fake_worker(*LONG, "--limit-worker-concurrency", str(n))
    live = [Outcome(i, stream=i % 2 == 0, max_tokens=150) for i in range(n)]
    async with http_client(stack, timeout=60) as client:
        await asyncio.gather(*(request(client, o) for o in live))
    phase1 = Summary("long", size)
    await finish(stack, live, phase1, started)
    s.notes["live_redelivered"] = phase1.redelivered
    if phase1.redelivered:
        s.violations.append(f"{phase1.redelivered} long jobs re-delivered while workers lived")

    # Phase 2: only `first` is left to take the jobs, then it dies.
    await asyncio.to_thread(stack.processes[-1].kill, signal.SIGTERM)
    # 400 tokens x 20 ms = 8 s each: `first` dies while it holds every one of them, found
    # by asking Redis (not after a sleep that a slow machine outlasts: its jobs then
    # finished on their first attempt and nothing was reclaimed)
    dying = [Outcome(n + i, stream=False, max_tokens=400) for i in range(n)]
    async with http_client(stack, timeout=120) as client:
        tasks = [asyncio.create_task(request(client, o)) for o in dying]
        await _until_pending(stack, n)
        await asyncio.to_thread(first.kill)
        s.faults = 1
        await asyncio.to_thread(stack.fake_worker, *LONG, "--limit-worker-concurrency", str(n))
        await asyncio.gather(*tasks)
    await finish(stack, live + dying, s, started)
    s.redelivered -= phase1.redelivered
    r = redis_client(stack)
    try:
        keys = Keys(stack.prefix)
        attempts = []
        for o in dying:
            log = await r.xrange(keys.chunk_log(MODEL, o.id)) if o.id else []
            attempts.append(max((json.loads(f["c"])["attempt"] for _, f in log), default=0))
    finally:
        await r.aclose()
    s.notes["reclaim_attempts"] = sorted(set(attempts))
    if set(attempts) != {2}:
        s.violations.append(f"jobs of the dead worker ended on attempts {sorted(attempts)}")
    return s


async def _until_pending(stack: Stack, n: int, guard: float = 120.0) -> None:
    """Wait until ``n`` jobs are delivered and not acknowledged (60+ s is a hang)."""
    r = redis_client(stack)
    deadline = time.monotonic() + guard
    try:
        while time.monotonic() < deadline:
            info = await r.xpending(Keys(stack.prefix).jobs(MODEL), GROUP)
            if int(info["pending"]) >= n:
                return
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()
    raise AssertionError(f"{n} jobs were not all delivered within {guard} s")


# ---------------------------------------------------------------------------------------------
# 10. Rolling restart: SIGTERM each worker, then each API, under load


async def rolling_restart(stack: Stack, *, n: int, size: str, seed: int = 10) -> Summary:
    """Two APIs and three workers under steady load; each worker in turn gets SIGTERM and a
    replacement, then each API. A SIGTERMed worker finishes what fits in its grace (1 s) and
    hands back the rest; a SIGTERMed API finishes open streams within its grace (2 s) or ends
    them with an error event. Clients that cannot connect (the API stopped listening) go to
    the other API: nothing was sent, so that is a retry, not a loss."""
    rng = random.Random(seed)
    s = Summary("rolling", size)
    started = time.monotonic()
    api_flags = ("--shutdown-grace", "2")
    w_flags = ("--fake-token-delay", "0.02", "--shutdown-grace", "1")
    apis = [stack.api(*api_flags)]
    urls = [stack.url]
    apis.append(stack.api(*api_flags))
    urls.append(stack.url)
    workers: list[Process] = [stack.fake_worker(*w_flags) for _ in range(3)]
    # Up to 200 tokens x 20 ms = 4 s: some outlast both graces.
    outcomes = [
        Outcome(i, stream=rng.random() < 0.7, max_tokens=rng.choice([10, 40, 80, 200]))
        for i in range(n)
    ]
    exits: list[float] = []

    async def stop(proc: Process) -> None:
        t0 = time.monotonic()
        await asyncio.to_thread(proc.kill, signal.SIGTERM)
        exits.append(time.monotonic() - t0)
        s.faults += 1

    async def restarter() -> None:
        for _ in range(3):
            await asyncio.sleep(1.5)
            victim = workers.pop(0)
            workers.append(await asyncio.to_thread(stack.fake_worker, *w_flags))
            await stop(victim)
        for i in range(2):
            await asyncio.sleep(1.0)
            await stop(apis[i])
            apis[i] = await asyncio.to_thread(stack.api, *api_flags)
            urls[i] = stack.url

    async def one(o: Outcome) -> None:
        for attempt in range(6):
            base = urls[(o.index + attempt) % 2]
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
                await request(client, o)
            # No response at all: the connection was refused or closed before the API read
            # the request (uvicorn closes connections it has not started on when it stops),
            # so nothing was accepted; the openai client retries such errors by itself.
            unanswered = o.status == 0 and o.exception.startswith(
                ("ConnectError", "ReadError", "RemoteProtocolError")
            )
            if not unanswered:
                return
            s.notes["connect_retries"] = s.notes.get("connect_retries", 0) + 1
            o.exception, o.finished = "", 0.0
            await asyncio.sleep(0.1)

    async def load() -> None:
        tasks = []
        for o in outcomes:
            tasks.append(asyncio.create_task(one(o)))
            await asyncio.sleep(rng.uniform(0.0, 0.04))
        await asyncio.gather(*tasks)

    await asyncio.gather(load(), restarter())
    await finish(stack, outcomes, s, started)
    s.notes["max_exit_s"] = round(max(exits), 2)
    s.notes["shutting_down_errors"] = sum(
        bool(o.error and o.error.get("code") == "server_shutting_down") for o in outcomes
    )
    if max(exits) > 8:
        s.slow.append(f"a SIGTERMed process took {max(exits):.1f}s to exit")
    return s
