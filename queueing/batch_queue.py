"""The RQ side of the Batch API: the queue a batch's job waits on and how it is queued.

A batch is one RQ job (its id is the batch's id) that `tokenrelay batch-worker` runs. RQ
retries it when it fails or its worker is lost (``Retry``): the job resumes the batch from
the line progress kept in Redis (queueing/batches.py). Job arguments are JSON, not pickle.
The API queues the job with a synchronous client (RQ has no asyncio one), in a thread.
"""

from __future__ import annotations

import json
import logging
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry as RedisRetry
from rq import Callback, Queue, Retry
from rq.serializers import JSONSerializer

from . import cluster, sentinel
from .batches import KEEP_ENDED_S, MOVE_SCRIPT, LineError
from .connection import RedisSettings
from .keys import Keys

log = logging.getLogger(__name__)

RUN_BATCH = "tokenrelay.api.batch_job.run_batch"
ON_FAILURE = "tokenrelay.api.batch_job.batch_job_failed"
RETRIES = 10  # crashes and restarts of batch workers one batch survives
FINALIZE_S = 3600  # job_timeout past the window: time to cancel what is left and write files
RESULT_TTL_S = 7 * 86400


def sync_connect(settings: RedisSettings) -> redis.Redis:
    """A synchronous client with the same timeouts as ``connection.connect`` (RQ needs
    bytes replies, and RESP2)."""
    options = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "protocol": 2,
        "retry": RedisRetry(ExponentialBackoff(cap=0.5, base=0.05), settings.retries),
        "health_check_interval": 30,
        "max_connections": 16,
    }
    if sentinel.is_sentinel(settings.url):
        return sentinel.sync_master(settings.url, **options)
    if cluster.wanted(settings.url):  # the API starts; batches are refused (api/batches.py)
        return cluster.sync_cluster(settings.url, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(settings.url, **options)


def batch_queue(connection: redis.Redis, keys: Keys) -> Queue:
    return Queue(keys.batch_queue, connection=connection, serializer=JSONSerializer)


def enqueue(connection: redis.Redis, keys: Keys, batch_id: str, window_s: int) -> None:
    """Queue the RQ job that runs ``batch_id``; it may run until the window ends and the
    output is written."""
    batch_queue(connection, keys).enqueue(
        RUN_BATCH,
        batch_id,
        job_id=batch_id,
        description=f"batch {batch_id}",
        job_timeout=window_s + FINALIZE_S,
        result_ttl=RESULT_TTL_S,
        failure_ttl=RESULT_TTL_S,
        retry=Retry(max=RETRIES),
        on_failure=Callback(ON_FAILURE),
    )


def fail_batch(connection: redis.Redis, keys: Keys, batch_id: str, reason: str) -> bool:
    """Mark a batch failed whose RQ job has no retry left (the runner itself cannot)."""
    error = LineError(code="batch_runner_failed", message=reason)
    now = int(time.time())
    moved, _ = connection.register_script(MOVE_SCRIPT)(
        keys=[keys.batch(batch_id), keys.active_batches, keys.batch_lines(batch_id)],
        args=[
            "validating,in_progress,finalizing,cancelling",
            "failed",
            KEEP_ENDED_S,
            "failed_at",
            now,
            "errors",
            json.dumps([error.model_dump()]),
        ],
    )
    return bool(moved)
