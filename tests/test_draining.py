"""SIGTERM on the API: open streams end themselves within --shutdown-grace."""

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
