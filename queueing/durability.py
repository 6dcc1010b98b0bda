"""Durable enqueue: a job is acknowledged only once a replica has it (``WAIT 1 <ms>``).

Replication is asynchronous: a primary that dies a moment after it answered an ``XADD`` may
take the job with it, and the replica that takes over never had it; its client would wait
for its deadline for an answer that cannot come. With durable enqueue the API sends the
enqueue script and ``WAIT 1 <ms>`` in one pipeline (one connection: ``WAIT`` counts the
writes of the connection it is sent on) and answers 503 with Retry-After if no replica
confirmed in time, never a silent success.

``--durable-enqueue``: ``auto`` (the default) waits while the primary reports a connected
replica, re-read at most every second and after any failure, so a primary left alone after
a failover keeps serving (logged: its enqueues are then as safe as the primary alone);
``on`` always waits (no replica: every enqueue is a 503); ``off`` never does.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from .cluster import is_cluster, node_of

log = logging.getLogger(__name__)

Mode = Literal["auto", "on", "off"]
MODES: tuple[Mode, ...] = ("auto", "on", "off")


class NotReplicated(Exception):
    """No replica confirmed the job in time: it must not be acknowledged."""


def online_replicas(info: dict) -> int:
    """The replicas ``INFO replication`` lists as online."""
    return sum(
        1
        for key, value in info.items()
        if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
    )


class Durability:
    def __init__(
        self,
        redis: aioredis.Redis,
        mode: Mode = "auto",
        timeout_ms: int = 1000,
        *,
        refresh_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.mode = mode
        self.timeout_ms = timeout_ms
        self.refresh_s = refresh_s
        # As last read, per primary ('' on a standalone Redis; on a Redis Cluster each
        # shard's primary is asked for itself: a shard just failed over may have none).
        self._replicas: dict[str, int] = {}
        self._read_at: dict[str, float] = {}
        self._refused = False  # INFO refused to this ACL user: logged once

    async def required(self, key: str = "") -> bool:
        """Whether this enqueue (of ``key``, on a Redis Cluster: the primary of its slot is
        asked) must wait for a replica. A Redis error reading the count is raised: the
        enqueue would meet it too (and a count kept from before a failover would make every
        enqueue on the new primary wait out its timeout)."""
        if self.mode != "auto":
            return self.mode == "on"
        node = await node_of(self.redis, key) if key and is_cluster(self.redis) else None
        name = node.name if node is not None else ""
        if name not in self._replicas or time.monotonic() - self._read_at[name] > self.refresh_s:
            self._note(name, await self._count_replicas(node))
            self._read_at[name] = time.monotonic()
        return bool(self._replicas[name])

    def forget(self) -> None:
        """Read the replica counts again before the next enqueue (after a failure: the
        primary may have changed)."""
        self._read_at = dict.fromkeys(self._read_at, 0.0)

    async def _count_replicas(self, node: object = None) -> int:
        try:
            if node is not None:
                info = await self.redis.info("replication", target_nodes=node)
            else:
                info = await self.redis.info("replication")
        except NoPermissionError as exc:
            if not self._refused:
                log.warning("durable enqueue off: this Redis user may not run INFO (%s)", exc)
                self._refused = True
            return 0
        return online_replicas(info)

    def _note(self, name: str, replicas: int) -> None:
        before, self._replicas[name] = self._replicas.get(name), replicas
        if before is not None and bool(before) == bool(replicas):
            return
        if replicas:
            log.info(
                "durable enqueue on: the primary%s has %d replica(s); a job is acknowledged "
                "once one has it (WAIT 1 %d)",
                f" {name}" if name else "",
                replicas,
                self.timeout_ms,
            )
        else:
            (log.warning if before else log.info)(
                "durable enqueue off: the primary%s reports no connected replica, so an "
                "enqueue is acknowledged by the primary alone (--durable-enqueue on refuses "
                "instead)",
                f" {name}" if name else "",
            )
