"""The API's side of the token path: one pub/sub connection for every in-flight request
(one per shard on a Redis Cluster).

Pub/sub is at-most-once, so a reader never trusts it alone. Each chunk has a sequence
number; a gap, or a quiet spell, makes the reader fetch what it missed from the request's
chunk log. A subscription is confirmed by Redis before the job is enqueued, so the first
chunk cannot be published into the void.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .cluster import is_cluster
from .keys import Keys
from .messages import Chunk, ErrorInfo
from .shards import ShardedChannels

log = logging.getLogger(__name__)


class Subscription:
    """The chunks of one request, in order, each exactly once, for its current attempt."""

    def __init__(self, relay: ChunkRelay, model: str, request_id: str) -> None:
        self.relay = relay
        self.channel = relay.keys.chunks(model, request_id)
        self.log_key = relay.keys.chunk_log(model, request_id)
        self.inbox: asyncio.Queue[Chunk] = asyncio.Queue()
        self.confirmed = asyncio.Event()
        self.attempt = 1
        self.next_seq = 0

    async def chunks(self, deadline: float, *, poll_interval: float = 1.0) -> AsyncIterator[Chunk]:
        """Yield chunks until a ``done`` one; a new attempt restarts the numbering.

        Past ``deadline`` (unix seconds) it yields a final timeout error chunk instead.
        """
        while True:
            left = deadline - time.time()
            if left <= 0:
                yield _deadline_chunk(self)
                return
            try:
                arrived = await asyncio.wait_for(self.inbox.get(), min(poll_interval, left))
            except TimeoutError:
                # A quiet spell: what pub/sub dropped is in the log (already in order and
                # marked consumed by _from_log, so it must not go through _accept again).
                ready = await self._from_log()
            else:
                ready = self._accept([arrived])
                if ready and ready[0].seq == self.next_seq:
                    self.next_seq += 1
                elif ready:
                    # A gap: what pub/sub dropped is in the log.
                    ready = await self._from_log()
            for chunk in ready:
                yield chunk
                if chunk.done:
                    return

    def _accept(self, chunks: list[Chunk]) -> list[Chunk]:
        """Drop stale attempts and duplicates; adopt a newer attempt."""
        fresh = []
        for chunk in chunks:
            if chunk.attempt > self.attempt:
                self.attempt, self.next_seq = chunk.attempt, 0
            if chunk.attempt == self.attempt and chunk.seq >= self.next_seq:
                fresh.append(chunk)
        return fresh

    async def _from_log(self) -> list[Chunk]:
        """Chunks after ``next_seq`` from the log, marked as consumed in order."""
        try:
            entries = await self.relay.redis.xrange(self.log_key)
        except RedisError as exc:
            log.warning("chunk log read failed for %s: %s", self.channel, exc)
            return []
        chunks = sorted(
            (Chunk.model_validate_json(fields["c"]) for _, fields in entries),
            key=lambda c: (c.attempt, c.seq),
        )
        # Only the newest attempt counts: chunks of an attempt it supersedes must not be
        # numbered as the new attempt's.
        newest = max([self.attempt, *(c.attempt for c in chunks)])
        chunks = [c for c in chunks if c.attempt == newest]
        out = []
        for chunk in self._accept(chunks):
            if chunk.seq == self.next_seq:
                self.next_seq += 1
                out.append(chunk)
        return out


class PlainChannels:
    """A standalone (or Sentinel) Redis: one pub/sub connection, read by one task."""

    def __init__(self, redis: aioredis.Redis, route: Callable[[dict[str, Any]], None]) -> None:
        self._pubsub: Any = redis.pubsub()
        self._route = route
        self._active = asyncio.Event()
        # One (un)subscribe at a time: redis-py's PubSub opens its connection on the first
        # command, and two first subscribes at once (the API's first requests) each opened
        # one, the second replacing the first, whose confirmation was then never read.
        self._sending = asyncio.Lock()
        self._task = asyncio.create_task(self._pump(), name="chunk-relay")

    async def add(self, channel: str) -> None:
        try:
            async with self._sending:
                await self._pubsub.subscribe(channel)
        except (RuntimeError, AttributeError) as exc:
            # The shared pub/sub connection was dropped (CLIENT KILL, a failover) and this
            # call raced the pump's reconnect on it: redis-py raises these, not a
            # ConnectionError. The caller answers 503, as for any lost connection.
            raise RedisConnectionError(f"pub/sub connection reset: {exc}") from exc
        self._active.set()

    async def remove(self, channel: str) -> None:
        async with self._sending:
            await self._pubsub.unsubscribe(channel)

    async def _pump(self) -> None:
        while True:
            try:
                if not self._pubsub.subscribed:
                    # Idle: sleep until a subscribe() needs its confirmation read.
                    self._active.clear()
                    await self._active.wait()
                    continue
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py reconnects and re-subscribes on the next read
                log.warning("pub/sub read failed, retrying: %s", exc)
                await asyncio.sleep(0.2)
                continue
            if message is not None:
                self._route(message)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


class ChunkRelay:
    """Routes every in-flight request's chunks to its :class:`Subscription`: over one
    pub/sub connection on a standalone Redis, one sharded pub/sub connection per shard on a
    Redis Cluster (queueing/shards.py)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._subs: dict[str, Subscription] = {}
        self._channels: PlainChannels | ShardedChannels | None = None

    async def start(self) -> None:
        if is_cluster(self.redis):
            self._channels = ShardedChannels(self.redis, self._route)  # type: ignore[arg-type]
        else:
            self._channels = PlainChannels(self.redis, self._route)

    async def close(self) -> None:
        if self._channels is not None:
            await self._channels.close()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, model: str, request_id: str, *, timeout: float = 5.0
    ) -> AsyncIterator[Subscription]:
        """Subscribe and wait until Redis confirms, so no chunk can precede us."""
        assert self._channels is not None, "ChunkRelay.start() first"
        channels = self._channels
        sub = Subscription(self, model, request_id)
        self._subs[sub.channel] = sub
        try:
            await channels.add(sub.channel)
            await asyncio.wait_for(sub.confirmed.wait(), timeout)
            yield sub
        finally:
            self._subs.pop(sub.channel, None)
            with contextlib.suppress(Exception):
                await asyncio.shield(channels.remove(sub.channel))

    def _route(self, message: dict[str, Any]) -> None:
        sub = self._subs.get(message.get("channel") or "")
        if sub is None:
            return
        if message["type"] in ("subscribe", "ssubscribe"):
            sub.confirmed.set()
        elif message["type"] in ("message", "smessage"):
            try:
                sub.inbox.put_nowait(Chunk.model_validate_json(message["data"]))
            except ValueError:
                log.error("dropping a malformed chunk on %s", sub.channel)


def _deadline_chunk(sub: Subscription) -> Chunk:
    return Chunk(
        id=sub.channel.rsplit(":", 1)[-1],
        attempt=sub.attempt,
        seq=sub.next_seq,
        done=True,
        error=ErrorInfo.deadline_exceeded(),
    )
