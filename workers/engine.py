"""The small interface every engine implements: submit, stream, cancel.

The worker loop only sees this, so a CPU step loop, the fake test engine and a GPU
continuous-batching engine are interchangeable.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenrelay.queueing.messages import ChoiceDelta, Job


class InvalidRequest(ValueError):
    """The job cannot run as asked (prompt too long, ...): the client gets a 400."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class EngineEvent:
    """New text for some choices of one job, with running token counts."""

    deltas: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int


_END = object()


@dataclass
class JobHandle:
    """The stream of one submitted job. The engine feeds it from any thread."""

    job_id: str
    loop: asyncio.AbstractEventLoop
    _queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def put(self, item: EngineEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    @staticmethod
    def put_all(
        loop: asyncio.AbstractEventLoop, items: list[tuple[JobHandle, EngineEvent]]
    ) -> None:
        """Deliver one step's events of many jobs with a single wake-up of the loop."""

        def deliver() -> None:
            for handle, event in items:
                handle._queue.put_nowait(event)

        if items:
            loop.call_soon_threadsafe(deliver)

    async def stream(self) -> AsyncIterator[list[EngineEvent]]:
        """Batches of events: whatever is ready at once, so a busy engine is not flushed
        token by token while an idle one is flushed immediately."""
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            events = []
            for item in items:
                if item is _END:
                    if events:
                        yield events
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, EngineEvent)
                events.append(item)
            yield events


class Engine(ABC):
    name: str = "engine"
    max_context: int = 0

    @abstractmethod
    def submit(self, job: Job) -> JobHandle:
        """Start generating ``job``; never blocks."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at the next step and free its slot; its stream then ends."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads and memory."""
