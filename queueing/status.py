"""A point-in-time view of the whole system, read from Redis alone.

One snapshot feeds ``GET /v1/status``, ``tokenrelay status`` and the gauges of
``/metrics``: per model the live workers, queued and running jobs of each lane
(interactive requests, Batch API lines), tokens/s and dead letters; per worker what its last
heartbeat reported; the batches not yet ended and the RQ queue that runs them.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ResponseError

from .batch_status import BatchesStatus, batches_snapshot
from .consumer import HANDED_BACK
from .keys import GROUP, Keys
from .registry import KNOWN_MODEL_TTL, Registry, WorkerInfo


class ModelStatus(BaseModel):
    name: str
    workers: int
    queued: int  # interactive: in the stream, not yet taken by a worker (or handed back)
    running: int  # interactive: taken by a worker, not yet acknowledged
    tokens_per_s: float  # the live workers' generation rate, summed
    dead_letters: int
    oldest_queued_s: float = 0.0  # age of the oldest interactive job no worker has taken yet
    batch_queued: int = 0  # the batch lane's, likewise
    batch_running: int = 0


class WorkerStatus(BaseModel):
    """What a worker's heartbeat reported (WorkerInfo, less its internal fields)."""

    id: str
    models: list[str]
    device: str
    capacity: int
    inflight: int
    engine: str
    weights: str = ""
    host: str
    pid: int
    started_at: float
    last_heartbeat: float
    tokens_per_s: float
    version: str


class Status(BaseModel):
    models: list[ModelStatus]
    workers: list[WorkerStatus]
    batches: BatchesStatus | None = None  # None: this Redis user may not read RQ's keys


async def snapshot(redis: aioredis.Redis, keys: Keys) -> Status:
    """Every model seen in the last week and every live worker, as Redis holds them now."""
    workers = await Registry(redis, keys).live_workers()
    names = set(await _known_models(redis, keys))
    for w in workers:
        names.update(w.models)
    models = [await _model_status(redis, keys, name, workers) for name in sorted(names)]
    reports = [WorkerStatus.model_validate(w.model_dump()) for w in workers]
    try:
        batches = await batches_snapshot(redis, keys)
    except ResponseError:  # NOPERM: an API user without the Batch API's rights
        batches = None
    return Status(models=models, workers=reports, batches=batches)


async def _known_models(redis: aioredis.Redis, keys: Keys) -> list[str]:
    since = time.time() - KNOWN_MODEL_TTL
    return list(await redis.zrangebyscore(keys.known_models, since, "+inf"))


async def _model_status(
    redis: aioredis.Redis, keys: Keys, name: str, workers: list[WorkerInfo]
) -> ModelStatus:
    stream = keys.jobs(name)
    queued, running = await _depth(redis, stream)
    batch_queued, batch_running = await _depth(redis, keys.batch_jobs(name))
    serving = [w for w in workers if name in w.models]
    return ModelStatus(
        name=name,
        workers=len(serving),
        queued=queued,
        running=running,
        tokens_per_s=round(sum(w.tokens_per_s for w in serving), 2),
        dead_letters=int(await redis.xlen(keys.dead_letters(name))),
        oldest_queued_s=await _oldest_queued_age(redis, stream),
        batch_queued=batch_queued,
        batch_running=batch_running,
    )


async def _depth(redis: aioredis.Redis, stream: str) -> tuple[int, int]:
    """Queued and running jobs of one job stream."""
    # Finished jobs are XDELed, so the stream holds exactly the queued + running ones.
    length = int(await redis.xlen(stream))
    running = await _running(redis, stream)
    return max(0, length - running), running


async def _running(redis: aioredis.Redis, stream: str) -> int:
    """Pending entries of real consumers (a stopping worker's handed-back jobs wait)."""
    try:
        summary = await redis.xpending(stream, GROUP)
    except ResponseError:  # no stream or no group yet
        return 0
    consumers = summary.get("consumers") or []
    handed_back = sum(int(c["pending"]) for c in consumers if c["name"] == HANDED_BACK)
    return int(summary.get("pending") or 0) - handed_back


async def _oldest_queued_age(redis: aioredis.Redis, stream: str) -> float:
    """Seconds since the oldest not-yet-delivered job was queued (its id is its time)."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:
        return 0.0
    last = next((g["last-delivered-id"] for g in groups if g["name"] == GROUP), "0-0")
    entries = await redis.xrange(stream, f"({last}", "+", count=1)
    if not entries:
        return 0.0
    queued_ms = int(entries[0][0].split("-", 1)[0])
    return round(max(0.0, time.time() - queued_ms / 1000), 3)
