"""Redis connection settings and client factory: explicit timeouts, protocol and pool size."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from . import cluster, sentinel
from .keys import Keys


@dataclass
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"  # or redis+sentinel://... (queueing/sentinel.py)
    prefix: str = "tr"
    # Over the longest blocking read (XREADGROUP BLOCK is 1 s), so a block never times out.
    socket_timeout: float = 10.0
    connect_timeout: float = 3.0
    max_connections: int = 256
    pool_timeout: float = 20.0  # waiting for a free pooled connection
    retries: int = 2  # RQ's synchronous client (queueing/batch_queue.py); see retry()

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)


def connect(settings: RedisSettings, decode_responses: bool = True) -> aioredis.Redis:
    """An asyncio client with a bounded, blocking pool (``decode_responses=False`` for one
    that reads bytes, as the file store's chunks are). ``settings.url`` is ``redis://``,
    ``rediss://`` (TLS) or ``redis+sentinel://`` (the primary a set of sentinels monitors).

    Commands are not retried (``retry``); enqueue is idempotent by request id all the same,
    so a client's own retry of a request whose reply was lost cannot queue its job twice.
    """
    options = {
        "socket_timeout": settings.socket_timeout,
        "socket_connect_timeout": settings.connect_timeout,
        "protocol": 2,
        "decode_responses": decode_responses,
        "retry": retry(settings),
        "health_check_interval": 30,
    }
    if cluster.wanted(settings.url):
        # No blocking pool in redis-py's cluster client: max_connections is per node, and
        # over it a command fails at once (MaxConnectionsError, a 503) instead of waiting.
        return cluster.async_cluster(  # type: ignore[return-value]
            settings.url, max_connections=settings.max_connections, **options
        )
    if sentinel.is_sentinel(settings.url):
        # Each connection asks the sentinels for the primary as it connects: one lost to a
        # failover reconnects to the new primary (queueing/sentinel.py).
        return sentinel.async_master(
            settings.url,
            max_connections=settings.max_connections,
            timeout=settings.pool_timeout,
            **options,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.pool_timeout,
        **options,
    )
    return aioredis.Redis(connection_pool=pool)


def retry(settings: RedisSettings) -> Retry:
    """No command is retried: a caller sees every error (the API answers 503, a worker
    re-reads its pending jobs), since a retried chunk pipeline whose reply was lost would log
    its chunk twice and a retried XREADGROUP would strand what the lost reply delivered.

    The Retry is asyncio's: redis-py runs its failure handler before giving up, which is how
    a pub/sub connection reconnects (and re-subscribes) after a reset or a failover. (The
    synchronous Retry this used before returned the coroutine unawaited, so the handler never
    ran, and the API's pub/sub connection never came back on its own after a reset: relayed
    chunks then arrived only through the once-a-second chunk-log reads.)
    """
    del settings
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), 0)
