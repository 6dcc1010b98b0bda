"""Resumable streams: a stream's record, who follows it, and the grace before a cancel.

When a stream's first chunk arrives, the API writes the stream's *record* (a hash beside its
chunk log, under the model's hash tag): the job, whether usage was asked, the caller's key
digest, and two counters, ``active`` (connections following it now) and ``joins`` (resumes
so far). A follower that leaves before the end (the client's connection broke) does not
cancel the job at once: it decrements ``active`` and, after ``grace`` seconds, one script
cancels the job only if nobody follows it then and nobody joined since it left. So a client
that comes back within the grace (GET /v1/chat/completions/{id}/stream, Last-Event-ID) gets
the rest of the same run; one that does not frees the worker's slot a grace later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import Chunk, Job

from .errors import APIError

log = logging.getLogger(__name__)

# A worker's chunk log lives 600 s after the stream's last chunk (workers' chunk_ttl), and a
# stream's last chunk comes by its deadline: the record outlives the log it points to.
LOG_TTL = 600
CANCEL_TTL = 3600  # as JobQueue.cancel

# Cancel only if nobody follows the stream now and nobody joined since the leaver left (and
# nobody cancelled it already: POST .../cancel, api/stream_cancel.py).
_CANCEL_IF_ABANDONED = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
local active = tonumber(redis.call('HGET', KEYS[1], 'active') or '0')
local joins = redis.call('HGET', KEYS[1], 'joins')
if active <= 0 and joins == ARGV[1] then
  redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
  return 1
end
return 0
"""


def owner_of(token: str | None) -> str:
    """The digest a record keeps of the caller's API key ("" on an API without keys)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else ""


def owned_by(owner: str, token: str | None) -> bool:
    """Whether the caller's key (``token``; None on an API without keys, where the id, 128
    random bits, is the only secret) is the one that started the stream."""
    return token is None or hmac.compare_digest(owner_of(token), owner)


def not_found(
    completion_id: str, why: str, code: str = "stream_not_found", *, to: str = "resume"
) -> APIError:
    return APIError(404, f"No stream '{completion_id}' to {to}: {why}", code=code)


@dataclass(frozen=True)
class Record:
    job: Job
    include_usage: bool
    owner: str


@dataclass(frozen=True)
class LogState:
    exists: bool  # the chunk log is still there (it lapses LOG_TTL after the last chunk)
    done: bool  # its newest chunk ends the stream, other than by a cancel
    cancelled: bool  # the job's cancel key is set


class Resumes:
    def __init__(self, redis: aioredis.Redis, keys: Keys, grace: float) -> None:
        self.redis = redis
        self.keys = keys
        self.grace = grace
        self._cancel = redis.register_script(_CANCEL_IF_ABANDONED)
        self._waiting: dict[asyncio.Task[None], Job] = {}

    @property
    def enabled(self) -> bool:
        return self.grace > 0

    async def open(self, job: Job, include_usage: bool, owner: str) -> None:
        """Write the stream's record, with its first follower."""
        key = self.keys.resume(job.model, job.id)
        ttl = max(1, round(job.deadline - time.time())) + LOG_TTL + 60
        pipe = self.redis.pipeline(transaction=False)
        fields = {
            "job": job.model_dump_json(),
            "usage": int(include_usage),
            "owner": owner,
            "active": 1,
            "joins": 0,
        }
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl)
        await pipe.execute()

    async def find(self, completion_id: str) -> Record | None:
        """The record of ``completion_id``, looked up under each model ever served."""
        models = await self.redis.zrange(self.keys.known_models, 0, -1)
        if not models:
            return None
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.hmget(self.keys.resume(_text(model), completion_id), ["job", "usage", "owner"])
        for job, usage, owner in await pipe.execute():
            if job is not None:
                return Record(Job.model_validate_json(job), _text(usage) == "1", _text(owner))
        return None

    async def state(self, job: Job) -> LogState:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrevrange(self.keys.chunk_log(job.model, job.id), count=1)
        pipe.exists(self.keys.cancel(job.model, job.id))
        last, cancelled = await pipe.execute()
        newest = Chunk.model_validate_json(last[0][1]["c"]) if last else None
        done = newest is not None and newest.done and not _ends_cancelled(newest)
        return LogState(exists=bool(last), done=done, cancelled=bool(cancelled))

    async def join(self, job: Job) -> None:
        key = self.keys.resume(job.model, job.id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(key, "active", 1)
        pipe.hincrby(key, "joins", 1)
        await pipe.execute()

    async def leave(self, job: Job) -> None:
        """A follower left before the end: cancel the job a grace later unless someone
        follows it then. A failure here cancels at once (nothing would cancel it later)."""
        key = self.keys.resume(job.model, job.id)
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hincrby(key, "active", -1)
            pipe.hget(key, "joins")
            _, joins = await pipe.execute()
        except RedisError as exc:
            log.warning("stream %s: could not leave for a resume (%s); cancelling", job.id, exc)
            await self._cancel_now(job)
            return
        task = asyncio.create_task(self._after_grace(job, _text(joins)), name=f"grace-{job.id}")
        self._waiting[task] = job
        task.add_done_callback(self._waiting.pop)

    async def close(self) -> None:
        """The server is stopping: settle every grace now (a job nobody follows is
        cancelled; one a resume follows, through another API process, keeps running)."""
        jobs = list(self._waiting.items())
        for task, _ in jobs:
            task.cancel()
        for task, job in jobs:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._settle(job, None)

    async def _after_grace(self, job: Job, joins: str) -> None:
        await asyncio.sleep(self.grace)
        await self._settle(job, joins)

    async def _settle(self, job: Job, joins: str | None) -> None:
        key = self.keys.resume(job.model, job.id)
        try:
            if joins is None:
                joins = _text(await self.redis.hget(key, "joins"))
            cancel = self.keys.cancel(job.model, job.id)
            if await self._cancel(keys=[key, cancel], args=[joins, CANCEL_TTL]):
                log.info("stream %s: nobody resumed it within %.0fs; cancelled", job.id, self.grace)
        except RedisError as exc:
            log.warning("stream %s: could not settle its grace: %s", job.id, exc)

    async def _cancel_now(self, job: Job) -> None:
        with contextlib.suppress(RedisError):
            await self.redis.set(self.keys.cancel(job.model, job.id), 1, ex=CANCEL_TTL)


def _ends_cancelled(chunk: Chunk) -> bool:
    """The last chunk a worker sends for a cancelled job (workers/worker.py)."""
    return chunk.error is not None and chunk.error.code == "cancelled"


def _text(value: object) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
