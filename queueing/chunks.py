"""The worker's side of the token path: numbered chunks, published and logged together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from .cluster import publish_command
from .fencing import Fence
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

    With a ``fence`` (a worker's delivery of the job) the round trip is one script that
    writes only while the worker still owns that delivery (queueing/fencing.py); otherwise
    :class:`~.fencing.LostDelivery` is raised and nothing was written. Log entries also
    carry the token counts so far (``p``, ``t``) and the delivery (``d``), from which a
    worker that reclaims the job continues it (workers/continuation.py).
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
        fence: Fence | None = None,
        seq: int = 0,
    ) -> None:
        self.redis = redis
        self.outbox = outbox
        self.request_id = request_id
        self.attempt = attempt  # the run whose text this is: a continuation keeps it
        self.ttl = ttl
        self.fence = fence
        self.seq = seq  # a continuation numbers its chunks after the last one sent
        self.first_seq = seq
        self._channel = keys.chunks(model, request_id)
        self._log = keys.chunk_log(model, request_id)
        self._cancel = keys.cancel(model, request_id)
        self._result = keys.result(model, request_id)
        self._publish = publish_command(redis)  # SPUBLISH on a Redis Cluster

    @property
    def sent(self) -> bool:
        """Whether this publisher sent any chunk."""
        return self.seq > self.first_seq

    async def send(
        self,
        choices: list[ChoiceDelta] | None = None,
        *,
        usage: Usage | None = None,
        error: ErrorInfo | None = None,
        done: bool = False,
        result: Result | None = None,
        tokens: Usage | None = None,
    ) -> bool:
        """Send one chunk; returns whether the request has been cancelled. ``tokens``: the
        counts so far, logged for a continuation (``usage`` is what the client sees)."""
        chunk = Chunk(
            id=self.request_id,
            attempt=self.attempt,
            seq=self.seq,
            choices=choices or [],
            usage=usage,
            error=error,
            done=done or error is not None or result is not None,
        )
        first = not self.sent
        self.seq += 1
        data = chunk.model_dump_json()
        entry: list[Any] = ["c", data]
        counts = tokens or usage
        if counts is not None:
            entry += ["p", counts.prompt_tokens, "t", counts.completion_tokens]
        if self.fence is not None:
            entry += ["d", self.fence.deliveries]
        # The log's TTL is renewed with every chunk: it lapses only chunk_ttl after the
        # stream's last chunk, never under a long generation still running.
        commands: list[Command] = [
            ("XADD", self._log, "*", *entry),
            ("EXPIRE", self._log, self.ttl),
            (self._publish, self._channel, data),
        ]
        if result is not None:
            commands.append(("SET", self._result, result.model_dump_json(), "EX", self.ttl))
        commands.append(("EXISTS", self._cancel))
        replies = await self._execute(commands, urgent=first or chunk.done)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return bool(replies[-1])

    async def _execute(self, commands: list[Command], *, urgent: bool) -> list[Any]:
        if self.fence is not None:
            keys = [self._log, self._channel, self._cancel, self._result]
            wrapped = [self.fence.wrap(keys, commands)]
            return self.fence.unwrap((await self._send(wrapped, urgent=urgent))[0])
        return await self._send(commands, urgent=urgent)

    async def _send(self, commands: list[Command], *, urgent: bool) -> list[Any]:
        if self.outbox is not None:
            return await self.outbox.send(commands, urgent=urgent)
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def reset_log(self) -> None:
        """Drop what an earlier delivery logged (a rerun starts the text over)."""
        if self.fence is not None:
            await self.fence.run(self.redis, [self._log], [("DEL", self._log)])
        else:
            await self.redis.delete(self._log)
