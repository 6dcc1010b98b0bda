"""The consumer side of the job streams: read, acknowledge, reclaim, dead-letter.

Each model has two job streams, one a lane (``keys.LANES``): interactive requests and Batch
API lines. Both share the consumer group ``workers``; a :class:`Delivery` remembers its lane,
so acknowledging, dead-lettering and handing it back touch the stream it came from.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .cluster import is_cluster
from .fencing import Fence, LostDelivery
from .keys import GROUP, LANES, Keys, Lane

# The consumer that jobs handed back by a stopping worker move to. No worker heartbeats under
# this name, so the next reclaim of any live worker takes them.
HANDED_BACK = "handed-back"

# Claim a pending job only when its owner's heartbeat key is gone. Owner check and claim run
# in one script, so a worker that is alive (however long its generation) never loses a job.
# The alive keys share the stream's {m:NAME} hash tag, so this stays single-slot on a cluster.
_RECLAIM = """
-- Scan past the live workers' entries (ARGV[5] at most): the oldest pending jobs are often
-- long generations of live workers, and a dead worker's newer ones must still be found.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[5]))
local claimed = {}
for _, p in ipairs(pending) do
  if #claimed >= tonumber(ARGV[4]) then break end
  local id, owner, deliveries = p[1], p[2], p[4]
  if owner ~= ARGV[2] and redis.call('EXISTS', ARGV[3] .. owner) == 0 then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    local entry = got[1]
    if entry and entry ~= false then
      local fields = entry[2]
      local job = ''
      for i = 1, #fields, 2 do if fields[i] == 'job' then job = fields[i + 1] end end
      table.insert(claimed, {id, job, tostring(deliveries + 1)})
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
    end
  end
end
return claimed
"""

# Re-read this consumer's own pending jobs (after a restart or a Redis error) as re-deliveries:
# XCLAIM each to itself, which counts a delivery, so a rerun's chunks carry a higher attempt
# than the ones an earlier run already sent. Jobs still running here (ARGV[5..]) are left
# alone, so they neither restart nor gain a delivery. Owner check and claim are one script:
# a job another worker reclaimed meanwhile (our heartbeat lapsed) is not taken back.
_OWN_PENDING = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
local skip = {}
for i = 5, #ARGV do skip[ARGV[i]] = true end
local claimed = {}
for _, p in ipairs(pending) do
  if #claimed >= tonumber(ARGV[3]) then break end
  local id, deliveries = p[1], p[4]
  if not skip[id] then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    local entry = got[1]
    if entry and entry ~= false then
      local fields = entry[2]
      local job = ''
      for i = 1, #fields, 2 do if fields[i] == 'job' then job = fields[i + 1] end end
      table.insert(claimed, {id, job, tostring(deliveries + 1)})
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
    end
  end
end
return claimed
"""


@dataclass
class Delivery:
    model: str
    entry_id: str
    payload: str  # the job's JSON
    attempt: int  # 1 for a first delivery
    reclaimed: bool = False  # claimed from a worker whose heartbeat lapsed
    lane: Lane = "interactive"
    settled: bool = False  # dead-lettered: acknowledged already

    @property
    def key(self) -> tuple[Lane, str]:
        """Unique among a worker's jobs: the two streams' entry ids may coincide."""
        return self.lane, self.entry_id

    def fence(self, keys: Keys, consumer: str) -> Fence:
        """What ``consumer`` must still own to write for this delivery (its attempt is the
        entry's delivery count)."""
        return Fence(keys.lane_jobs(self.model, self.lane), self.entry_id, consumer, self.attempt)


class JobConsumer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._reclaim = redis.register_script(_RECLAIM)
        self._own_pending = redis.register_script(_OWN_PENDING)

    async def ensure_groups(self, models: list[str]) -> None:
        for model in models:
            for lane in LANES:
                stream = self.keys.lane_jobs(model, lane)
                try:
                    await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    async def read(
        self,
        models: list[str],
        count: int,
        block_ms: int | None,
        *,
        lanes: Sequence[Lane] = ("interactive",),
        own_pending: bool = False,
        running: Collection[str] = (),
    ) -> list[Delivery]:
        """New jobs (``>``) from the streams of ``lanes`` (``count`` at most from each;
        ``block_ms`` None does not block), or with ``own_pending`` this consumer's unacked
        ones of its one lane.

        An own pending job is a re-delivery: its attempt is its delivery count, like a
        reclaimed job's. Entry ids in ``running`` (jobs of that lane still running here) are
        skipped.
        """
        if own_pending:
            (lane,) = lanes
            return await self._read_own_pending(models, count, running, lane)
        if len(models) > 1 and is_cluster(self.redis):
            return await self._read_per_slot(models, count, block_ms, lanes)
        by_stream = {self.keys.lane_jobs(m, lane): (m, lane) for lane in lanes for m in models}
        reply = await self.redis.xreadgroup(
            GROUP, self.consumer, dict.fromkeys(by_stream, ">"), count=count, block=block_ms
        )
        deliveries = []
        for stream, entries in reply or []:
            model, lane = by_stream[stream]
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending
                    await self.ack(model, entry_id, lane=lane)
                    continue
                deliveries.append(Delivery(model, entry_id, fields.get("job", ""), 1, lane=lane))
        return deliveries

    async def _read_per_slot(
        self, models: list[str], count: int, block_ms: int | None, lanes: Sequence[Lane]
    ) -> list[Delivery]:
        """On a Redis Cluster one XREADGROUP reads the streams of one slot: one model's.
        Every model is read at once without blocking; if none had a job, each blocks in turn
        for its share of ``block_ms``."""
        got: list[Delivery] = []
        for model in models:
            got += await self.read([model], count, None, lanes=lanes)
        if got or block_ms is None:
            return got
        share = max(1, block_ms // len(models))
        for model in models:
            got += await self.read([model], count, share, lanes=lanes)
            if got:
                break
        return got

    async def _read_own_pending(
        self, models: list[str], count: int, running: Collection[str], lane: Lane
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for model in models:
            left = count - len(deliveries)
            if left <= 0:
                break
            rows = await self._own_pending(
                keys=[self.keys.lane_jobs(model, lane)],
                args=[GROUP, self.consumer, left, left + len(running), *running],
            )
            deliveries += [
                Delivery(model, entry_id, job, int(n), lane=lane) for entry_id, job, n in rows
            ]
        return deliveries

    async def ack(self, model: str, entry_id: str, *, lane: Lane = "interactive") -> None:
        """Acknowledge and delete an entry, unfenced: for one just read (deleted while
        pending) and for tests; a worker's job goes through :meth:`finish`."""
        stream = self.keys.lane_jobs(model, lane)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        await pipe.execute()

    def fence(self, delivery: Delivery) -> Fence:
        return delivery.fence(self.keys, self.consumer)

    async def finish(self, delivery: Delivery) -> None:
        """XACK + XDEL a job, only while this consumer still owns its delivery (raises
        :class:`~.fencing.LostDelivery` otherwise); a dead-lettered one is done already."""
        if delivery.settled:
            return
        fence = self.fence(delivery)
        await fence.run(
            self.redis,
            [],
            [
                ("XACK", fence.stream, GROUP, delivery.entry_id),
                ("XDEL", fence.stream, delivery.entry_id),
            ],
        )
        delivery.settled = True

    async def reclaim(
        self, model: str, count: int = 100, scan: int = 1000, *, lane: Lane = "interactive"
    ) -> list[Delivery]:
        """Claim up to ``count`` jobs of ``lane`` whose owner stopped heartbeating, looking
        at the ``scan`` oldest pending entries; attempt counts every delivery."""
        rows = await self._reclaim(
            keys=[self.keys.lane_jobs(model, lane)],
            args=[GROUP, self.consumer, self.keys.alive_prefix(model), count, max(scan, count)],
        )
        return [
            Delivery(model, entry_id, job, int(n), reclaimed=True, lane=lane)
            for entry_id, job, n in rows
        ]

    async def hand_back(self, deliveries: list[Delivery]) -> int:
        """Give read jobs back to the group at once (a stopping worker's unstarted or
        unfinished jobs), without waiting for its heartbeat to lapse. JUSTID: the move
        itself counts no delivery. Fenced: a job another worker owns by now stays its.
        Returns how many went back."""
        given = 0
        for delivery in deliveries:
            fence = self.fence(delivery)
            move = ("XCLAIM", fence.stream, GROUP, HANDED_BACK, 0, delivery.entry_id, "JUSTID")
            try:
                await fence.run(self.redis, [], [move])
            except LostDelivery:
                continue
            given += 1
        return given

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a job that keeps failing out of the way, keeping it for inspection. Both
        lanes share the model's dead-letter stream; each entry says its lane. Fenced, like
        every write for a job."""
        fence = self.fence(delivery)
        dead = self.keys.dead_letters(delivery.model)
        entry = ("job", delivery.payload, "reason", reason, "attempts", delivery.attempt)
        await fence.run(
            self.redis,
            [dead],
            [
                ("XADD", dead, "*", *entry, "lane", delivery.lane),
                ("XACK", fence.stream, GROUP, delivery.entry_id),
                ("XDEL", fence.stream, delivery.entry_id),
            ],
        )
        delivery.settled = True

    async def is_cancelled(self, model: str, request_ids: list[str]) -> list[bool]:
        if not request_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.exists(self.keys.cancel(model, rid))
        return [bool(x) for x in await pipe.execute()]
