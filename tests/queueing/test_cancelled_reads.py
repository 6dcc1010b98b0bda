"""Regression for CVE-2023-28858/28859: a cancelled async Redis command must not leave its
connection holding a reply that the next command on that connection then reads as its own.

Two halves, neither depending on the machine's speed:

- Certain cancels mid-read: a BLPOP (alone, and last in a pipeline) on a pool of one
  connection is cancelled only once the server reports that connection blocked in it, so the
  command was sent and its reply is still owed. An ECHO is then sent through the pool, and
  only after that is the BLPOP's reply made to come (LPUSH): the ECHO must read its own
  reply. A redis-py that handed the cancelled connection on fails every round.
- Cancels at varied points: tasks sharing a small pool round-trip values unique to each call
  (SET then GET of its own key, and ECHO) and are cancelled after a number of event-loop turns
  that adapts until both cancelled and completed calls have been seen many times. Every reply
  that does arrive must belong to its command.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from tokenrelay.queueing.connection import RedisSettings, connect

HANG_GUARD_S = 60.0  # only against a hang; nothing below waits on the machine's speed
ROUNDS = 20  # certain cancels mid-read, for each of the single and pipelined BLPOP
ENOUGH = 150  # cancelled and completed calls wanted from the varied cancels
MAX_CALLS = 30_000  # a bound on calls, not on time


async def client_info(control: aioredis.Redis, client_id: int) -> dict[str, str]:
    """The server's CLIENT LIST fields for one connection; empty once it has closed."""
    line = await control.execute_command("CLIENT", "LIST", "ID", client_id)
    return dict(field.partition("=")[::2] for field in line.split())


async def until(ready: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(HANG_GUARD_S):
        while not await ready():
            await asyncio.sleep(0.001)


async def cancel_one_blocked_read(
    redis: aioredis.Redis, control: aioredis.Redis, key: str, pipelined: bool
) -> str | None:
    """Cancel a BLPOP the server holds blocked, then send an ECHO; what the ECHO misread."""

    async def blpop() -> object:
        if not pipelined:
            return await redis.blpop([key], timeout=0)
        pipe = redis.pipeline(transaction=False)
        pipe.echo(f"before {key}").blpop([key], timeout=0)
        return await pipe.execute()

    async def blocked(*, queued: bool = False) -> bool:
        info = await client_info(control, client_id)
        in_blpop = info.get("cmd") == "blpop" and "b" in info.get("flags", "")
        return in_blpop and (not queued or int(info["qbuf"]) > 0)

    client_id = await redis.client_id()  # the pool's only connection runs the BLPOP
    task = asyncio.create_task(blpop())
    await until(blocked)
    task.cancel()
    await asyncio.wait({task})
    assert task.cancelled(), f"BLPOP {key} ended without its cancel: {task!r}"
    # The ECHO is sent (on that connection, were it handed on: the server queues it behind the
    # BLPOP) and only then does the cancelled BLPOP's reply come.
    own = f"own {key}"
    echo = asyncio.create_task(redis.echo(own))

    async def sent() -> bool:
        return echo.done() or await blocked(queued=True)

    await until(sent)
    await control.lpush(key, "stale reply")
    got = await echo
    return None if got == own else f"ECHO {own!r} after a cancelled BLPOP: {got!r}"


@pytest.mark.parametrize("pipelined", [False, True], ids=["command", "pipeline"])
async def test_cancel_while_blocked_in_a_read_never_hands_its_reply_on(
    redis_settings: RedisSettings, pipelined: bool
) -> None:
    # A read timeout past the hang guard: only the cancel may end the BLPOP.
    settings = RedisSettings(redis_settings.url, max_connections=1, socket_timeout=HANG_GUARD_S * 2)
    redis, control = connect(settings), connect(redis_settings)
    try:
        misread = [
            await cancel_one_blocked_read(redis, control, f"{redis_settings.prefix}:{r}", pipelined)
            for r in range(ROUNDS)
        ]
    finally:
        await redis.aclose()
        await control.aclose()
    assert not any(misread), [m for m in misread if m]


async def cancel_after_turns(call: Coroutine[Any, Any, None], turns: int) -> bool:
    """Run a call, cancelling it after `turns` event-loop turns; True if it completed."""
    task = asyncio.create_task(call)
    for _ in range(turns):
        if task.done():
            break
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait({task})
    if task.cancelled():
        return False
    task.result()  # a failure other than the cancel is the test's
    return True


async def test_cancelled_reads_never_hand_one_command_anothers_reply(
    redis_settings: RedisSettings,
) -> None:
    redis = connect(RedisSettings(url=redis_settings.url, max_connections=4))
    rng = random.Random(28858)
    wrong: list[str] = []
    counts = {"ok": 0, "cancelled": 0, "calls": 0}
    # Mean turns before the cancel: up after a cancel, down after a completion, so about
    # half the calls are cut off, wherever on this machine that falls.
    turns = 8.0

    async def call(task: int, i: int) -> None:
        key = f"{redis_settings.prefix}:cve:{task}"
        value = f"{task}-{i}-{rng.random()}"
        await redis.set(key, value, ex=60)
        got = await redis.get(key)
        # An earlier SET of this task may have been the last to land; never another's.
        if got is not None and not got.startswith(f"{task}-"):
            wrong.append(f"GET {key}: {got!r}, expected {value!r}")
        if (echo := await redis.echo(value)) != value:
            wrong.append(f"ECHO {value!r}: {echo!r}")

    def enough() -> bool:
        return min(counts["ok"], counts["cancelled"]) >= ENOUGH

    async def worker(task: int) -> None:
        nonlocal turns
        i = 0
        while not enough() and counts["calls"] < MAX_CALLS:
            counts["calls"] += 1
            i += 1
            done = await cancel_after_turns(call(task, i), rng.randint(0, round(2 * turns)))
            counts["ok" if done else "cancelled"] += 1
            turns = max(1.0, turns * (0.9 if done else 1.1))

    try:
        async with asyncio.timeout(HANG_GUARD_S * 4):
            await asyncio.gather(*(worker(t) for t in range(16)))
    finally:
        await redis.aclose()
    assert not wrong, wrong[:10]
    assert enough(), counts
