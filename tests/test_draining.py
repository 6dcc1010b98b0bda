"""SIGTERM: the API ends open streams within --shutdown-grace; a worker finishes what fits in
its grace and hands the rest back."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator

import httpx

from tokenrelay.api.draining import Drain, until_drained

from .stack import Stack


async def _ticks(every: float) -> AsyncIterator[int]:
    i = 0
    while True:
        await asyncio.sleep(every)
        yield i
        i += 1


async def test_a_flowing_stream_still_ends_at_the_grace() -> None:
    """Regression: the deadline was checked only while no item came for 0.25 s, so a stream
    whose tokens kept flowing outlived the grace and was cut by the server mid-body."""
    drain = Drain(grace=0.2)
    drain.begin()
    started = time.monotonic()
    items = [i async for i in until_drained(_ticks(0.01), drain)]
    assert items[-1] is None
    assert time.monotonic() - started < 1.0


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
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                return [line async for line in r.aiter_lines() if line]

    tasks = [asyncio.create_task(one(i)) for i in range(3)]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(api.popen.send_signal, signal.SIGTERM)
    for lines in await asyncio.gather(*tasks):
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "server_shutting_down"
    await asyncio.to_thread(api.popen.wait, 10)


async def _whole(url: str, i: int, tokens: int) -> dict:
    body = {"model": "fake", "prompt": f"job {i}", "max_tokens": tokens}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()


async def test_worker_sigterm_finishes_jobs_within_its_grace(stack: Stack) -> None:
    """Regression: when every in-flight job finished within the grace, the drain called
    asyncio.wait() on an empty set and the worker exited with a traceback."""
    stack.api()
    worker = stack.fake_worker("--fake-token-delay", "0.02", "--shutdown-grace", "10")
    tasks = [asyncio.create_task(_whole(stack.url, i, 50)) for i in range(3)]
    await asyncio.sleep(0.5)
    worker.popen.send_signal(signal.SIGTERM)
    for answer in await asyncio.gather(*tasks):
        assert answer["choices"][0]["finish_reason"] == "length"
    assert await asyncio.to_thread(worker.popen.wait, 15) == 0
    assert "Traceback" not in worker.output()


async def test_worker_sigterm_hands_back_what_outlasts_its_grace(stack: Stack) -> None:
    stack.api()
    leaving = stack.fake_worker("--fake-token-delay", "0.05", "--shutdown-grace", "0.5")
    tasks = [asyncio.create_task(_whole(stack.url, i, 60)) for i in range(3)]  # 3 s each
    await asyncio.sleep(0.5)
    stack.fake_worker("--fake-token-delay", "0.01")
    leaving.popen.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.popen.wait, 15) == 0
    assert "handed back 3 jobs" in leaving.output()
    for answer in await asyncio.gather(*tasks):  # the other worker ran them again
        assert answer["choices"][0]["finish_reason"] == "length"
