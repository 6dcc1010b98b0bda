"""The worker's side of the token path: numbered chunks, published and logged together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from .keys import Keys
from .messages import ChoiceDelta, Chunk, ErrorInfo, Result, Usage

log = logging.getLogger(__name__)

Command = tuple[Any, ...]


class ChunkOutbox:
    """One pipeline per round for the chunks of every job a worker runs.

    A round trip per job per token caps a worker at a few thousand chunks a second; here
    all jobs' chunks that are ready go out together. A round waits up to ``interval`` after
    the previous one, so a busy job's tokens coalesce into fewer, larger chunks, except
    that a first or last chunk is sent at once (time to first token is not taxed).
    """

    def __init__(self, redis: aioredis.Redis, *, interval: float = 0.02) -> None:
        self.redis = redis
        self.interval = interval
        self._pending: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
        self._wake = asyncio.Event()
        self._urgent = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chunk-outbox")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send(self, commands: list[Command], *, urgent: bool) -> list[Any]:
        """Queue ``commands`` for the next round; returns their replies."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((commands, future))
        self._urgent = self._urgent or urgent
        self._wake.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._wake.wait()
            wait = last + self.interval - loop.time()
            if not self._urgent and wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            batch, self._pending, self._urgent = self._pending, [], False
            last = loop.time()
            await self._flush(batch)

    async def _flush(self, batch: list[tuple[list[Command], asyncio.Future[list[Any]]]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for commands, _ in batch:
            for command in commands:
                pipe.execute_command(*command)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every sender sees it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for commands, future in batch:
            if not future.done():
                future.set_result(replies[start : start + len(commands)])
            start += len(commands)


class ChunkPublisher:
    """Publishes one request's chunks.

    Each chunk goes to the request's pub/sub channel (fast, at-most-once) and, in the same
    round trip, to a short-lived log stream from which a reader repairs a gap. The same round
    trip reads the request's cancel key, so cancellation costs no extra call.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        model: str,
        request_id: str,
        *,
        attempt: int = 1,
        ttl: int = 600,
        outbox: ChunkOutbox | None = None,
    ) -> None:
        self.redis = redis
        self.outbox = outbox
        self.request_id = request_id
        self.attempt = attempt
        self.ttl = ttl
        self.seq = 0
        self._channel = keys.chunks(model, request_id)
        self._log = keys.chunk_log(model, request_id)
        self._cancel = keys.cancel(model, request_id)
        self._result = keys.result(model, request_id)

    async def send(
        self,
        choices: list[ChoiceDelta] | None = None,
        *,
        usage: Usage | None = None,
        error: ErrorInfo | None = None,
        done: bool = False,
        result: Result | None = None,
    ) -> bool:
        """Send one chunk; returns whether the request has been cancelled."""
        chunk = Chunk(
            id=self.request_id,
            attempt=self.attempt,
            seq=self.seq,
            choices=choices or [],
            usage=usage,
            error=error,
            done=done or error is not None or result is not None,
        )
        self.seq += 1
        data = chunk.model_dump_json()
        commands: list[Command] = [("XADD", self._log, "*", "c", data)]
        if chunk.seq == 0 or chunk.done:  # the log's TTL: set once, renewed at the end
            commands.append(("EXPIRE", self._log, self.ttl))
        commands.append(("PUBLISH", self._channel, data))
        if result is not None:
            commands.append(("SET", self._result, result.model_dump_json(), "EX", self.ttl))
        commands.append(("EXISTS", self._cancel))
        replies = await self._execute(commands, urgent=chunk.seq == 0 or chunk.done)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return bool(replies[-1])

    async def _execute(self, commands: list[Command], *, urgent: bool) -> list[Any]:
        if self.outbox is not None:
            return await self.outbox.send(commands, urgent=urgent)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def has_sent_tokens(self) -> bool:
        """Whether an earlier attempt already logged chunks for this request."""
        return int(await self.redis.xlen(self._log)) > 0

    async def reset_log(self) -> None:
        await self.redis.delete(self._log)
