"""The worker registry: a key per worker with a TTL refreshed by heartbeat.

This replaces FastChat's controller. A worker that stops heartbeating drops out of dispatch
when its keys expire (seconds), and its per-model ``alive`` keys are what reclaim checks.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from .keys import Keys
from .tokenizers import TOKENIZER_TTL

KNOWN_MODEL_TTL = 7 * 24 * 3600

log = logging.getLogger(__name__)


class WorkerInfo(BaseModel):
    id: str
    models: list[str]
    device: str
    capacity: int
    inflight: int = 0
    started_at: float = Field(default_factory=time.time)
    version: str = ""
    host: str = ""
    pid: int = 0
    max_context: int = 0
    engine: str = ""
    weights: str = ""  # the weight format: a --low-bit name, or the dtype
    last_heartbeat: float = 0.0  # unix seconds, set by each heartbeat
    tokens_per_s: float = 0.0  # completion tokens per second over the last few seconds
    tokens_total: int = 0  # completion tokens generated since the worker started
    tokenizer: str = ""  # digest of the tokenizer files it published (queueing/tokenizers.py)
    # what its model does: "generate" (chat, completions) or "embed" (/v1/embeddings); an
    # older worker's record has none and generates
    task: str = "generate"
    dimensions: int = 0  # an embedding model's vector length


class Registry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def heartbeat(self, info: WorkerInfo, ttl: float) -> None:
        ms = int(ttl * 1000)
        now = time.time()
        info.last_heartbeat = now
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.worker(info.id), info.model_dump_json(), px=ms)
        pipe.sadd(self.keys.workers, info.id)
        for model in info.models:
            pipe.set(self.keys.alive(model, info.id), 1, px=ms)
            pipe.zadd(self.keys.known_models, {model: now})
            if info.tokenizer:  # kept while a worker that uses it lives
                pipe.expire(self.keys.tokenizer(model, info.tokenizer), TOKENIZER_TTL)
        await pipe.execute()

    async def deregister(self, info: WorkerInfo) -> None:
        """Drop a worker at once, so its pending jobs can be reclaimed without waiting."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.worker(info.id))
        pipe.srem(self.keys.workers, info.id)
        for model in info.models:
            pipe.delete(self.keys.alive(model, info.id))
        await pipe.execute()

    async def live_workers(self) -> list[WorkerInfo]:
        ids = sorted(await self.redis.smembers(self.keys.workers))
        if not ids:
            return []
        # GETs in a pipeline, not one MGET: on a Redis Cluster the records lie in many slots,
        # and a record on a shard that is failing over is skipped, not a failed read.
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.get(self.keys.worker(worker_id))
        values = await pipe.execute(raise_on_error=False)
        if all(isinstance(v, Exception) for v in values):
            raise values[0]
        for worker_id, value in zip(ids, values, strict=True):
            if isinstance(value, Exception):
                log.warning("worker %s's record not read (skipped): %r", worker_id, value)
        gone = [i for i, v in zip(ids, values, strict=True) if v is None]
        if gone:
            await self.redis.srem(self.keys.workers, *gone)
        return [WorkerInfo.model_validate_json(v) for v in values if isinstance(v, str | bytes)]

    async def live_models(self) -> dict[str, list[WorkerInfo]]:
        models: dict[str, list[WorkerInfo]] = {}
        for worker in await self.live_workers():
            for model in worker.models:
                models.setdefault(model, []).append(worker)
        return models

    async def is_known(self, model: str) -> bool:
        """Whether a worker ever served ``model`` recently (503 when none is live, not 404)."""
        seen = await self.redis.zscore(self.keys.known_models, model)
        return seen is not None and seen > time.time() - KNOWN_MODEL_TTL
