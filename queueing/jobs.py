"""The producer side of a model's job stream: idempotent, bounded enqueue and cancellation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from .keys import Keys, Lane
from .messages import Job

# The job stream is never trimmed (trimming deletes unread jobs); its length is bounded here
# instead. Finished jobs are XACKed and XDELed, so XLEN is queued + in flight.
_ENQUEUE = """
local existing = redis.call('GET', KEYS[2])
if existing then return {'dup', existing} end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
redis.call('SET', KEYS[2], id, 'EX', tonumber(ARGV[3]))
return {'ok', id}
"""


@dataclass
class EnqueueResult:
    status: Literal["ok", "dup", "full"]
    detail: str  # the stream entry id, or the queue depth when full


class JobQueue:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, marker_ttl: int = 3600) -> None:
        self.redis = redis
        self.keys = keys
        self.marker_ttl = marker_ttl
        self._enqueue = redis.register_script(_ENQUEUE)

    async def enqueue(
        self, job: Job, *, max_depth: int, lane: Lane = "interactive"
    ) -> EnqueueResult:
        """Queue ``job`` once on its ``lane``'s stream: a retry with the same request id
        returns the first entry. ``max_depth`` bounds that lane's stream only."""
        status, detail = await self._enqueue(
            keys=[self.keys.lane_jobs(job.model, lane), self.keys.enqueued(job.model, job.id)],
            args=[job.model_dump_json(), max_depth, self.marker_ttl],
        )
        return EnqueueResult(status, detail)

    async def depth(self, model: str) -> int:
        """Interactive jobs queued + running: what the API's 429 admission counts."""
        return int(await self.redis.xlen(self.keys.jobs(model)))

    async def batch_depth(self, model: str) -> int:
        """Batch-lane jobs queued + running."""
        return int(await self.redis.xlen(self.keys.batch_jobs(model)))

    async def cancel(self, model: str, request_id: str, *, ttl: int = 3600) -> None:
        await self.redis.set(self.keys.cancel(model, request_id), 1, ex=ttl)

    async def dead_letter_count(self, model: str) -> int:
        return int(await self.redis.xlen(self.keys.dead_letters(model)))
