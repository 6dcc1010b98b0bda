"""Regression for CVE-2023-28858/28859: a cancelled async Redis command must not leave its
connection holding a reply that the next command on that connection then reads as its own.

Many tasks share one bounded pool; each round-trips a value unique to its call (SET then
GET of its own key, and ECHO) under ``asyncio.wait_for`` with timeouts so tiny that many
calls are cancelled mid-read. Every reply that does arrive must belong to its command.
"""

from __future__ import annotations

import asyncio
import random

from tokenrelay.queueing.connection import RedisSettings, connect


async def test_cancelled_reads_never_hand_one_command_anothers_reply(
    redis_settings: RedisSettings,
) -> None:
    redis = connect(RedisSettings(url=redis_settings.url, max_connections=16))
    rng = random.Random(28858)
    wrong: list[str] = []
    counts = {"ok": 0, "cancelled": 0}

    async def call(task: int, i: int) -> None:
        key = f"{redis_settings.prefix}:cve:{task}"
        value = f"{task}-{i}-{rng.random()}"
        try:
            await asyncio.wait_for(redis.set(key, value, ex=60), rng.uniform(0.0001, 0.003))
            got = await asyncio.wait_for(redis.get(key), rng.uniform(0.0001, 0.003))
            # An earlier SET of this task may have been the last to land; never another's.
            if got is not None and not got.startswith(f"{task}-"):
                wrong.append(f"GET {key}: {got!r}, expected {value!r}")
            echo = await asyncio.wait_for(redis.echo(value), rng.uniform(0.0001, 0.003))
            if echo != value:
                wrong.append(f"ECHO {value!r}: {echo!r}")
            counts["ok"] += 1
        except TimeoutError:
            counts["cancelled"] += 1

    async def worker(task: int) -> None:
        for i in range(60):
            await call(task, i)

    try:
        await asyncio.gather(*(worker(t) for t in range(64)))
    finally:
        await redis.aclose()
    assert not wrong, wrong[:10]
    assert counts["cancelled"] > 100 and counts["ok"] > 100, counts
