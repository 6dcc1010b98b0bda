"""Graceful stop of the API: on SIGTERM, open requests get ``--shutdown-grace`` seconds.

uvicorn stops accepting connections at once and waits for open ones. sse-starlette would
cancel every open stream the moment the server starts to exit (the client sees a cut
connection, not a terminal event), so streams are given a longer grace of their own and
end themselves: they finish if their job does within the grace, else they send an error
event and ``[DONE]``. A request still waiting for its answer gets a 503 at the same point.
Leaving either way sets the job's cancel key, so its worker stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import TypeVar

import uvicorn

from .errors import APIError

T = TypeVar("T")
POLL = 0.25  # seconds between checks of the drain deadline while waiting for a chunk


class Drain:
    """When the server began to stop, and how long open requests have from then."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.started: float | None = None

    def begin(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def expired(self) -> bool:
        return self.started is not None and time.monotonic() >= self.started + self.grace


def shutting_down() -> APIError:
    return APIError(
        503,
        "The server is shutting down and this request did not finish within its grace "
        "period. Retry: another server instance will take it.",
        type="server_overloaded",
        code="server_shutting_down",
        retry_after=1,
    )


async def until_drained(items: AsyncIterator[T], drain: Drain) -> AsyncIterator[T | None]:
    """Yield ``items``; once the drain's grace has run out, yield ``None`` and stop."""
    it = aiter(items)
    while True:
        # Checked before every item, not only while waiting: a stream whose tokens keep
        # coming would otherwise outlive the grace and be cut by the server, not ended.
        if drain.expired():
            yield None
            return
        nxt = asyncio.ensure_future(anext(it))
        try:
            while not nxt.done():
                await asyncio.wait({nxt}, timeout=POLL)
                if not nxt.done() and drain.expired():
                    yield None
                    return
        finally:
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(BaseException):
                    await nxt
        try:
            item = nxt.result()
        except StopAsyncIteration:
            return
        yield item


class DrainingServer(uvicorn.Server):
    """A uvicorn server that starts its app's drain clock on the exit signal."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)
