"""The worker's side of the token path: numbered chunks, published and logged together."""

from __future__ import annotations

import redis.asyncio as aioredis

from .keys import Keys
from .messages import ChoiceDelta, Chunk, ErrorInfo, Result, Usage


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
    ) -> None:
        self.redis = redis
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
        data = chunk.model_dump_json(exclude_defaults=False)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self._log, {"c": data})
        pipe.expire(self._log, self.ttl)
        pipe.publish(self._channel, data)
        if result is not None:
            pipe.set(self._result, result.model_dump_json(), ex=self.ttl)
        pipe.exists(self._cancel)
        replies = await pipe.execute()
        return bool(replies[-1])

    async def has_sent_tokens(self) -> bool:
        """Whether an earlier attempt already logged chunks for this request."""
        return int(await self.redis.xlen(self._log)) > 0

    async def reset_log(self) -> None:
        await self.redis.delete(self._log)
