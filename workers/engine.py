"""The small interface every engine implements: submit, stream, cancel.

The worker loop only sees this, so a CPU step loop, the fake test engine and a GPU
continuous-batching engine are interchangeable.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tokenrelay.queueing.messages import ChoiceDelta, ErrorInfo, Job


class InvalidRequest(ValueError):
    """The job cannot run as asked (prompt too long, ...): the client gets a 400."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param  # the request field at fault

    def error(self) -> ErrorInfo:
        """What the client gets: a 400 in OpenAI's shape."""
        return ErrorInfo(
            message=str(self),
            type="invalid_request_error",
            code=self.code,
            status=400,
            param=self.param,
        )


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
    # a Batch API line (the batch lane): an engine that can runs it only where it does
    # not slow interactive jobs down (admitted after them, paused beside them on a CPU)
    background: bool = False
    _queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def put(self, item: EngineEvent | BaseException) -> None:
        _call_soon(self.loop, self._queue.put_nowait, item)

    def close(self) -> None:
        _call_soon(self.loop, self._queue.put_nowait, _END)

    @staticmethod
    def put_all(
        loop: asyncio.AbstractEventLoop, items: list[tuple[JobHandle, EngineEvent]]
    ) -> None:
        """Deliver one step's events of many jobs with a single wake-up of the loop."""

        def deliver() -> None:
            for handle, event in items:
                handle._queue.put_nowait(event)

        if items:
            _call_soon(loop, deliver)

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


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: object) -> None:
    """Hand ``callback`` to the job's event loop from the engine thread. A loop that has
    closed has no reader left for the stream: dropping the item beats killing the engine
    thread with the RuntimeError."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


class Engine(ABC):
    name: str = "engine"
    max_context: int = 0
    # The model's generation_config defaults, for sampling fields a request leaves out.
    sampling_defaults: Mapping[str, float | int] = MappingProxyType({})
    weights: str = ""  # the weight format: a --low-bit name or a dtype (registry, status)

    @abstractmethod
    def submit(self, job: Job, *, background: bool = False) -> JobHandle:
        """Start generating ``job``; never blocks. ``background``: a Batch API line, which
        interactive jobs go before (JobHandle.background)."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` at the next step and free its slot; its stream then ends."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads and memory."""


class ThreadedEngine(Engine):
    """An engine whose model runs in a thread of its own: jobs arrive through an inbox
    (``None`` asks the thread to stop), cancellations through a locked set."""

    # what _collect fills; a batching engine sets these before its thread starts
    _waiting: list[Any]
    _waiting_since: float = 0.0  # when the oldest waiting job arrived
    _closed: bool = False

    def _start_thread(self, name: str) -> None:
        self._inbox: queue.Queue[tuple[Job, JobHandle] | None] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, background: bool = False) -> JobHandle:
        handle = JobHandle(job.id, asyncio.get_running_loop(), background)
        self._inbox.put((job, handle))
        return handle

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def forget_cancel(self, job_id: str) -> bool:
        """Whether ``job_id`` was cancelled; clears the mark (the job is over)."""
        with self._lock:
            cancelled = job_id in self._cancelled
            self._cancelled.discard(job_id)
        return cancelled

    def _collect(self, block: bool, timeout: float | None = None) -> None:
        """Move what the inbox holds onto ``_waiting`` (``block``: wait for the first item,
        at most ``timeout`` seconds); ``None`` marks the engine closed."""
        try:
            item = self._inbox.get(block=block, timeout=timeout if block else None)
            while True:
                if item is None:
                    self._closed = True
                else:
                    if not self._waiting:
                        self._waiting_since = time.monotonic()
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @abstractmethod
    def _loop(self) -> None:
        """The engine thread's body."""


def max_tokens_for(job: Job, prompt_len: int, max_context: int) -> int:
    """The completion budget of ``job``: what it asked for, or all the room left; a 400
    (context_length_exceeded) when the prompt and the ask do not fit."""
    room = max_context - prompt_len
    asked = job.params.max_tokens
    if room <= 0 or (asked is not None and asked > room):
        field = "prompt" if job.kind == "completion" else "messages"
        raise InvalidRequest(
            f"This model's maximum context length is {max_context} tokens. However, you "
            f"requested {prompt_len + (asked or 0)} tokens ({prompt_len} in the {field}, "
            f"{asked or 0} in the completion). Please reduce the length of the {field} or "
            "completion.",
            code="context_length_exceeded",
            param=field,
        )
    return asked if asked is not None else room
