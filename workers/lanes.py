"""Which lane a worker's free slots read from: interactive requests first, Batch API lines
only with the slots they leave, keeping a reserve free for interactive arrivals.

One round of the read loop, with ``free`` slots::

    XREADGROUP interactive  COUNT free          (no BLOCK)   got some: start them
    XREADGROUP batch        COUNT free-reserve  (no BLOCK)   only if that is > 0
    XREADGROUP BLOCK        interactive (+ batch when room)  waits for either; an
                                                             interactive job wakes it at once

A batch line starts only when no interactive job is waiting and at least ``reserve`` slots
stay free after it, so an interactive request arriving while batch lines fill the worker
still finds a slot at once instead of waiting for a line to finish.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from redis.exceptions import RedisError

from tokenrelay.queueing.consumer import Delivery, JobConsumer
from tokenrelay.queueing.keys import Lane

log = logging.getLogger(__name__)

# With no room for batch lines the wait listens to the interactive stream only; it wakes
# this often to see whether a finished job has made room for a batch line again.
BATCH_POLL_MS = 100


def batch_reserve(concurrency: int) -> int:
    """Slots batch lines leave free: a quarter, at least one, none with a single slot (a
    one-slot worker would otherwise never run a batch line)."""
    return min(max(1, concurrency // 4), concurrency - 1)


def batch_room(concurrency: int, free: int) -> int:
    """How many batch lines may start now, with ``free`` slots and no interactive job
    waiting."""
    return max(0, free - batch_reserve(concurrency))


@dataclass
class LaneReader:
    """The read loop's reads, by the rule above."""

    consumer: JobConsumer
    models: list[str]
    concurrency: int
    block_ms: int = 1000

    async def read(self, free: int) -> list[Delivery]:
        got = await self.consumer.read(self.models, free, None)
        if got:
            return got
        room = batch_room(self.concurrency, free)
        if room:
            for model in self.models:  # COUNT is per stream: one model at a time keeps room
                got += await self.consumer.read([model], room - len(got), None, lanes=["batch"])
                if len(got) >= room:
                    break
            if got:
                return got
            # both lanes wake it; COUNT room bounds what a batch arrival takes, and an
            # interactive burst beyond it is read at once in the next round
            return await self.consumer.read(
                self.models, room, self.block_ms, lanes=["interactive", "batch"]
            )
        return await self.consumer.read(self.models, free, min(self.block_ms, BATCH_POLL_MS))

    async def read_own_pending(
        self, free: int, running: Mapping[Lane, Collection[str]]
    ) -> tuple[list[Delivery], bool]:
        """This worker's own unacked jobs, interactive first; the batch ones were admitted
        before, so they take any free slot, not only the batch room. Returns them and
        whether none are left."""
        mine = await self.consumer.read(
            self.models, free, None, own_pending=True, running=running.get("interactive", ())
        )
        left = free - len(mine)
        if left <= 0:
            return mine, False
        batch = await self.consumer.read(
            self.models,
            left,
            None,
            lanes=["batch"],
            own_pending=True,
            running=running.get("batch", ()),
        )
        return mine + batch, len(batch) < left

    async def reclaim(self, free: int) -> list[Delivery]:
        """A dead worker's jobs, up to ``free``: interactive ones first, then batch lines
        within the batch room."""
        claimed = await self._reclaim("interactive", free)
        room = batch_room(self.concurrency, free - len(claimed))
        if room:
            claimed += await self._reclaim("batch", room)
        return claimed

    async def _reclaim(self, lane: Lane, count: int) -> list[Delivery]:
        claimed: list[Delivery] = []
        for model in self.models:
            if count - len(claimed) <= 0:
                break
            try:
                claimed += await self.consumer.reclaim(model, count=count - len(claimed), lane=lane)
            except (RedisError, OSError) as exc:
                log.warning("reclaim failed: %s", exc)
        return claimed
