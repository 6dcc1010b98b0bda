"""SIGTERM: the API ends open streams within --shutdown-grace; a worker finishes what fits in
its grace and hands the rest back."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import httpx
import redis

from tokenrelay.api.draining import Drain, until_drained
from tokenrelay.queueing.keys import GROUP, Keys

from .stack import Stack

HANG_GUARD_S = 60.0  # only against a hang: nothing below asserts the machine's speed


async def _flowing() -> AsyncIterator[int]:
    """Items that never pause: each is ready at once, however slow the machine."""
    i = 0
    while True:
        await asyncio.sleep(0)
        yield i
        i += 1


async def test_a_flowing_stream_still_ends_at_the_grace() -> None:
    """Regression: the deadline was checked only while no item came for 0.25 s, so a stream
    whose tokens kept flowing outlived the grace and was cut by the server mid-body."""
    drain = Drain(grace=0.2)
    drain.begin()
    last: int | None = 0
    async with asyncio.timeout(HANG_GUARD_S):  # with that bug this stream never ends
        async for item in until_drained(_flowing(), drain):
            last = item
    assert last is None
    assert drain.expired()


def _wait_pending(r: redis.Redis, prefix: str, count: int) -> None:
    """Until the worker holds ``count`` fake jobs: read from the stream, not yet acked."""
    deadline = time.monotonic() + HANG_GUARD_S
    while r.xpending(Keys(prefix).jobs("fake"), GROUP)["pending"] < count:
        assert time.monotonic() < deadline, f"the worker never held {count} jobs"
        time.sleep(0.02)


async def test_sigterm_ends_open_streams_with_a_terminal_event(stack: Stack) -> None:
    api = stack.api("--shutdown-grace", "1")
    stack.fake_worker("--fake-token-delay", "0.05")

    async def one(i: int) -> list[str]:
        body = {
            "model": "fake",
            "stream": True,
            "max_tokens": 400,  # 20 s of tokens: far past the grace
            "messages": [{"role": "user", "content": f"hi {i}"}],
        }
        async with httpx.AsyncClient(base_url=stack.url, timeout=HANG_GUARD_S) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = []
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        streaming.release()
                return lines

    streaming = asyncio.Semaphore(0)  # one release per line; the first tells us it is open
    tasks = [asyncio.create_task(one(i)) for i in range(3)]
    async with asyncio.timeout(HANG_GUARD_S):
        for _ in tasks:  # each stream has sent a line (not: a second has passed)
            await streaming.acquire()
    await asyncio.to_thread(api.popen.send_signal, signal.SIGTERM)
    for lines in await asyncio.gather(*tasks):
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down"
    await asyncio.to_thread(api.popen.wait, HANG_GUARD_S)


async def _whole(url: str, i: int, tokens: int) -> dict:
    body = {"model": "fake", "prompt": f"job {i}", "max_tokens": tokens}
    async with httpx.AsyncClient(base_url=url, timeout=HANG_GUARD_S) as client:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()


async def test_worker_sigterm_finishes_jobs_within_its_grace(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    """Regression: when every in-flight job finished within the grace, the drain called
    asyncio.wait() on an empty set and the worker exited with a traceback."""
    stack.api()
    # A grace (60 s) that 1 s of tokens fits in on any machine.
    worker = stack.fake_worker("--fake-token-delay", "0.02", "--shutdown-grace", "60")
    tasks = [asyncio.create_task(_whole(stack.url, i, 50)) for i in range(3)]
    await asyncio.to_thread(_wait_pending, sync_redis, stack.prefix, 3)
    worker.popen.send_signal(signal.SIGTERM)
    for answer in await asyncio.gather(*tasks):
        assert answer["choices"][0]["finish_reason"] == "length"
    assert await asyncio.to_thread(worker.popen.wait, HANG_GUARD_S) == 0
    assert "Traceback" not in worker.output()


async def test_worker_sigterm_hands_back_what_outlasts_its_grace(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    stack.api()
    leaving = stack.fake_worker("--fake-token-delay", "0.05", "--shutdown-grace", "0.5")
    tasks = [asyncio.create_task(_whole(stack.url, i, 60)) for i in range(3)]  # 3 s each
    # SIGTERM as soon as it holds all three, so each has far more than the grace left; the
    # worker that runs them again starts only after, so it cannot have taken any first.
    await asyncio.to_thread(_wait_pending, sync_redis, stack.prefix, 3)
    leaving.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.popen.wait, HANG_GUARD_S) == 0
    assert "handed back 3 jobs" in leaving.output()
    stack.fake_worker("--fake-token-delay", "0.01")
    for answer in await asyncio.gather(*tasks):  # the other worker ran them again
        assert answer["choices"][0]["finish_reason"] == "length"
