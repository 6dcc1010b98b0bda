"""The producer side of a model's job stream: idempotent, bounded enqueue and cancellation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from .cluster import is_cluster, node_of
from .durability import Durability, NotReplicated
from .keys import Keys, Lane
from .messages import Job

# The job stream is never trimmed (trimming deletes unread jobs); its length is bounded here
# instead. Finished jobs are XACKed and XDELed, so XLEN is queued + in flight.
# ARGV[4] = '1' (durable enqueue): a duplicate rewrites its marker unchanged, so the WAIT
# after it covers the first XADD too (a retry may come on another connection, and WAIT
# counts only the writes of its own).
_ENQUEUE = """
local existing = redis.call('GET', KEYS[2])
if existing then
  if ARGV[4] == '1' then redis.call('SET', KEYS[2], existing, 'KEEPTTL') end
  return {'dup', existing}
end
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
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        marker_ttl: int = 3600,
        durability: Durability | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.marker_ttl = marker_ttl
        self.durability = durability
        self._enqueue = redis.register_script(_ENQUEUE)

    async def enqueue(
        self, job: Job, *, max_depth: int, lane: Lane = "interactive"
    ) -> EnqueueResult:
        """Queue ``job`` once on its ``lane``'s stream: a retry with the same request id
        returns the first entry. ``max_depth`` bounds that lane's stream only.

        With durable enqueue (queueing/durability.py) it returns only once a replica has the
        job, and raises NotReplicated if none confirmed in time."""
        keys = [self.keys.lane_jobs(job.model, lane), self.keys.enqueued(job.model, job.id)]
        args = [job.model_dump_json(), max_depth, self.marker_ttl]
        try:
            if self.durability is None or not await self.durability.required(keys[0]):
                status, detail = await self._enqueue(keys=keys, args=[*args, 0])
                return EnqueueResult(status, detail)
            return await self._enqueue_replicated(keys, [*args, 1], self.durability)
        except (RedisError, NotReplicated):
            if self.durability is not None:
                self.durability.forget()
            raise

    async def _enqueue_replicated(
        self, keys: list[str], args: list, durability: Durability
    ) -> EnqueueResult:
        """The script and WAIT in one pipeline, on one connection: WAIT counts the writes
        of its own connection only."""
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            if is_cluster(self.redis):
                # The script and WAIT to the primary of the job's slot, one connection. A
                # cluster pipeline takes no EVALSHA (and EVAL needs no NOSCRIPT round).
                node = await node_of(self.redis, keys[0])
                pipe.execute_command("EVAL", _ENQUEUE, len(keys), *keys, *args)
                pipe.execute_command("WAIT", 1, durability.timeout_ms, target_nodes=node)
            else:
                pipe.evalsha(self._enqueue.sha, len(keys), *keys, *args)
                pipe.execute_command("WAIT", 1, durability.timeout_ms)
            reply, replicas = await pipe.execute(raise_on_error=False)
            if isinstance(reply, NoScriptError):  # a new primary, or SCRIPT FLUSH
                await self.redis.script_load(_ENQUEUE)
                continue
            if isinstance(reply, Exception):
                raise reply
            if isinstance(replicas, Exception):
                raise replicas
            status, detail = reply
            if status != "full" and int(replicas) < 1:
                raise NotReplicated(
                    f"no replica confirmed the job within {durability.timeout_ms} ms"
                )
            return EnqueueResult(status, detail)
        raise NoScriptError("the enqueue script could not be loaded")

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
