"""A worker that comes back from the dead notices it lost its jobs, and lets go of them.

Frozen (SIGSTOP, a stalled VM) or cut off from Redis past its heartbeat TTL, a worker has
its jobs reclaimed by others. Its writes for them are fenced (queueing/fencing.py), so
nothing it sends lands; this module makes it stop working on them too. Once a heartbeat it
looks its running deliveries up in the pending lists; a job's write that the fence refused
reports the same way. Each lost job's generation is cancelled (its slot is free at once),
and the heartbeat logs how many jobs it dropped and why, with how long its heartbeat had
lapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis

from tokenrelay.queueing.consumer import Delivery, JobConsumer
from tokenrelay.queueing.fencing import LostDelivery, lost
from tokenrelay.queueing.keys import Lane

log = logging.getLogger(__name__)

Key = tuple[Lane, str]


class Ownership:
    def __init__(self, redis: aioredis.Redis, consumer: JobConsumer) -> None:
        self.redis = redis
        self.consumer = consumer
        self.dropped = 0  # jobs dropped since this worker started
        self._seen: set[tuple[str, str, int]] = set()  # (stream, entry id, delivery)
        self._reasons: Counter[str] = Counter()  # since the last report

    def drop(self, exc: LostDelivery) -> bool:
        """Count a lost delivery once; returns whether it was new."""
        f = exc.fence
        mark = (f.stream, f.entry_id, f.deliveries)
        if mark in self._seen:
            return False
        self._seen.add(mark)
        self.dropped += 1
        self._reasons[exc.reason.split(" (")[0]] += 1
        log.warning("dropping job %s: %s", f.entry_id, exc.reason)
        return True

    async def check(
        self, deliveries: Mapping[Key, Delivery], tasks: Mapping[Key, asyncio.Task[None]]
    ) -> None:
        """Cancel the running jobs whose delivery this worker no longer owns."""
        snapshot = dict(deliveries)
        fences = {self.consumer.fence(d): key for key, d in snapshot.items()}
        for exc in await lost(self.redis, list(fences)):
            if not exc.owner:
                # Not pending: most likely this worker's own ack racing the look-up. If a new
                # owner finished it instead, the job's next write is refused and reports it.
                continue
            task = tasks.get(fences[exc.fence])
            if task is not None and not task.done() and self.drop(exc):
                task.cancel()  # the job's task cancels its generation: the slot frees

    def beat(self, ttl: float) -> Callable[[], None]:
        """A function to call after each successful heartbeat: it reports drops, with the
        longest gap between heartbeats since the last report."""
        last_ok = time.monotonic()
        lapsed = 0.0

        def beat() -> None:
            nonlocal last_ok, lapsed
            now = time.monotonic()
            lapsed, last_ok = max(lapsed, now - last_ok), now
            if self._reasons:
                self._report(lapsed)
                lapsed = 0.0
            elif lapsed > ttl:
                log.warning("heartbeat lapsed for %.1fs; no job was lost", lapsed)
                lapsed = 0.0

        return beat

    def _report(self, lapsed: float) -> None:
        count = sum(self._reasons.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self._reasons.items())
        log.warning(
            "dropped %d jobs this worker no longer owns (%s): its heartbeat had lapsed for "
            "%.1fs (frozen or cut off from Redis), so other workers took them; their "
            "generations are stopped and their slots free",
            count,
            why,
            lapsed,
        )
        self._reasons.clear()
        if len(self._seen) > 10_000:
            self._seen.clear()
