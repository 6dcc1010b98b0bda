"""Scenario 12: a worker frozen (SIGSTOP) past its heartbeat TTL under load, then resumed.

Its jobs are reclaimed and continued by the other worker while it is stopped. Resumed, it
still holds their generations, and without fencing it would go on publishing, logging and
acknowledging them: the clients would get two runs spliced into one text, and the chunk logs
the same chunk number twice. With fencing nothing it writes for them lands, and within a
heartbeat it drops them and says so in its log.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import time

import redis.asyncio as aioredis

from tokenrelay.queueing.keys import GROUP, Keys

from ..stack import Process, Stack
from .client import bounded, finish, http_client, redis_client, request
from .ledger import MODEL, Outcome, Summary

FLAGS = ("--fake-token-delay", "0.03", "--heartbeat-interval", "0.25", "--heartbeat-ttl", "1.0")
GUARD_S = 90.0  # a step not done by then is a fault on any machine
DROPPED = re.compile(r"dropped (\d+) jobs this worker no longer owns")


async def freeze_worker(stack: Stack, *, n: int, size: str, seed: int = 12) -> Summary:
    rng = random.Random(seed)
    s = Summary("freeze", size)
    started = time.monotonic()
    stack.api()
    victim = stack.fake_worker(*FLAGS)
    stack.fake_worker(*FLAGS)
    # 60-150 tokens x 30 ms: 2-4.5 s each, so the freeze catches streams in the middle
    outcomes = [
        Outcome(i, stream=rng.random() < 0.8, max_tokens=rng.randint(60, 150)) for i in range(n)
    ]
    r = redis_client(stack)
    held: set[str] = set()  # entries the victim owned at some point during the freeze
    try:
        async with http_client(stack, timeout=120) as client:
            load = asyncio.create_task(bounded([request(client, o) for o in outcomes], 12))
            victim_id = await _worker_id(r, stack, victim)
            # freeze it mid-stream: holding several jobs that have sent tokens
            await _until(lambda: _owned(r, stack, victim_id, held), 4, "the victim holds no job")
            await asyncio.sleep(0.3)
            held.clear()
            await asyncio.to_thread(victim.popen.send_signal, signal.SIGSTOP)
            s.faults = 1
            await _owned(r, stack, victim_id, held)
            # frozen until the other worker has reclaimed every job the victim held
            await _until(lambda: _owned(r, stack, victim_id, held), 0, "jobs not reclaimed")
            await asyncio.sleep(0.5)  # a little longer: jobs reach it while it is stopped
            await _until(lambda: _owned(r, stack, victim_id, held), 0, "jobs not reclaimed")
            await asyncio.to_thread(victim.popen.send_signal, signal.SIGCONT)
            await load
        await finish(stack, outcomes, s, started)
        dropped = await _dropped(victim, len(held))
        # its slots are free again: the registry record it heartbeats counts none in flight
        await _until(lambda: _inflight(r, stack, victim_id), 0, "the resumed worker's slots freed")
    finally:
        await r.aclose()
    s.notes.update(held_by_frozen=len(held), dropped_in_its_log=dropped)
    if dropped != len(held):
        s.violations.append(f"the resumed worker logged {dropped} dropped jobs, held {len(held)}")
    worker_lost = [o.id for o in outcomes if o.error and o.error.get("code") == "worker_lost"]
    if worker_lost:
        s.violations.append(f"{len(worker_lost)} streams ended worker_lost: {worker_lost[:5]}")
    if not victim.alive():
        s.violations.append("the resumed worker exited")
    return s


async def _worker_id(r: aioredis.Redis, stack: Stack, proc: Process) -> str:
    keys = Keys(stack.prefix)
    for worker_id in await r.smembers(keys.workers):
        info = await r.get(keys.worker(worker_id))
        if info and json.loads(info).get("pid") == proc.popen.pid:
            return worker_id
    raise AssertionError(f"no registry record for pid {proc.popen.pid}")


async def _inflight(r: aioredis.Redis, stack: Stack, worker_id: str) -> int:
    info = await r.get(Keys(stack.prefix).worker(worker_id))
    return json.loads(info)["inflight"] if info else -1


async def _owned(r: aioredis.Redis, stack: Stack, consumer: str, held: set[str]) -> int:
    rows = await r.xpending_range(Keys(stack.prefix).jobs(MODEL), GROUP, "-", "+", 1000, consumer)
    held.update(row["message_id"] for row in rows)
    return len(rows)


async def _until(count, want: int, what: str) -> None:
    """Poll ``count()`` until it is ``want`` (0), or at least ``want``."""
    deadline = time.monotonic() + GUARD_S
    while time.monotonic() < deadline:
        got = await count()
        if (got == 0) if want == 0 else (got >= want):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} within {GUARD_S:.0f} s")


async def _dropped(proc: Process, expected: int) -> int:
    """The jobs the resumed worker's log says it dropped (each heartbeat's report, summed),
    once they reach ``expected`` or the guard passes."""
    deadline = time.monotonic() + GUARD_S
    while True:
        total = sum(int(m) for m in DROPPED.findall(proc.output()))
        if total >= expected or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.1)
