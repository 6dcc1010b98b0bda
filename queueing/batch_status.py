"""The Batch API's part of the status snapshot: batches not yet ended, and the RQ queue.

Read from the batch store's active set and from RQ's own keys (its queue list, started and
failed registries, worker set), so `tokenrelay status`, ``GET /v1/status`` and ``/metrics``
show what rq-dashboard shows, without an RQ client.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from pydantic import BaseModel
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from .batches import BatchStore
from .keys import Keys


class BatchProgress(BaseModel):
    id: str
    status: str
    model: str | None = None
    total: int  # lines; 0 until validated
    completed: int
    failed: int
    created_at: int


class BatchQueueStatus(BaseModel):
    """The RQ queue of batch jobs."""

    name: str
    queued: int  # jobs waiting for a batch worker
    running: int  # jobs a batch worker runs now (fresh heartbeat)
    failed: int  # jobs RQ gave up on (in its failed registry)
    workers: int  # batch workers registered on the queue


class BatchesStatus(BaseModel):
    active: list[BatchProgress]
    queue: BatchQueueStatus


async def batches_snapshot(redis: aioredis.Redis, keys: Keys) -> BatchesStatus:
    active = [
        BatchProgress.model_validate(b.model_dump()) for b in await BatchStore(redis, keys).active()
    ]
    return BatchesStatus(active=active, queue=await _queue(redis, keys.batch_queue))


async def _queue(redis: aioredis.Redis, name: str) -> BatchQueueStatus:
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.llen(Queue.redis_queue_namespace_prefix + name)
    # registry scores are expiry times: entries past theirs wait for RQ's cleanup
    pipe.zcount(StartedJobRegistry.key_template.format(name), now, "+inf")
    pipe.zcount(FailedJobRegistry.key_template.format(name), now, "+inf")
    pipe.smembers(WORKERS_BY_QUEUE_KEY % name)
    queued, running, failed, worker_keys = await pipe.execute()
    workers = 0
    if worker_keys:
        workers = int(await redis.exists(*worker_keys))
    return BatchQueueStatus(
        name=name, queued=queued, running=running, failed=failed, workers=workers
    )
