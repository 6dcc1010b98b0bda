"""The consumer side of the job streams: read, acknowledge, reclaim, dead-letter."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .keys import GROUP, Keys

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


class JobConsumer:
    def __init__(self, redis: aioredis.Redis, keys: Keys, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.consumer = consumer
        self._reclaim = redis.register_script(_RECLAIM)
        self._own_pending = redis.register_script(_OWN_PENDING)

    async def ensure_groups(self, models: list[str]) -> None:
        for model in models:
            try:
                await self.redis.xgroup_create(self.keys.jobs(model), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(
        self,
        models: list[str],
        count: int,
        block_ms: int,
        *,
        own_pending: bool = False,
        running: Collection[str] = (),
    ) -> list[Delivery]:
        """New jobs (``>``), or with ``own_pending`` this consumer's unacked ones.

        An own pending job is a re-delivery: its attempt is its delivery count, like a
        reclaimed job's. Entry ids in ``running`` (jobs still running here) are skipped.
        """
        if own_pending:
            return await self._read_own_pending(models, count, running)
        streams = {self.keys.jobs(m): ">" for m in models}
        reply = await self.redis.xreadgroup(
            GROUP, self.consumer, streams, count=count, block=block_ms
        )
        by_stream = {self.keys.jobs(m): m for m in models}
        deliveries = []
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                if fields is None:  # deleted while pending
                    await self.ack(by_stream[stream], entry_id)
                    continue
                deliveries.append(Delivery(by_stream[stream], entry_id, fields.get("job", ""), 1))
        return deliveries

    async def _read_own_pending(
        self, models: list[str], count: int, running: Collection[str]
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for model in models:
            left = count - len(deliveries)
            if left <= 0:
                break
            rows = await self._own_pending(
                keys=[self.keys.jobs(model)],
                args=[GROUP, self.consumer, left, left + len(running), *running],
            )
            deliveries += [Delivery(model, entry_id, job, int(n)) for entry_id, job, n in rows]
        return deliveries

    async def ack(self, model: str, entry_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys.jobs(model), GROUP, entry_id)
        pipe.xdel(self.keys.jobs(model), entry_id)
        await pipe.execute()

    async def reclaim(self, model: str, count: int = 100, scan: int = 1000) -> list[Delivery]:
        """Claim up to ``count`` jobs whose owner stopped heartbeating, looking at the
        ``scan`` oldest pending entries; attempt counts every delivery."""
        rows = await self._reclaim(
            keys=[self.keys.jobs(model)],
            args=[GROUP, self.consumer, self.keys.alive_prefix(model), count, max(scan, count)],
        )
        return [Delivery(model, entry_id, job, int(n), reclaimed=True) for entry_id, job, n in rows]

    async def hand_back(self, model: str, entry_ids: list[str]) -> None:
        """Give read jobs back to the group at once (a stopping worker's unstarted or
        unfinished jobs), without waiting for its heartbeat to lapse. JUSTID: the move
        itself counts no delivery."""
        if entry_ids:
            await self.redis.xclaim(
                self.keys.jobs(model), GROUP, HANDED_BACK, 0, entry_ids, justid=True
            )

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a job that keeps failing out of the way, keeping it for inspection."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.keys.dead_letters(delivery.model),
            {"job": delivery.payload, "reason": reason, "attempts": delivery.attempt},
        )
        pipe.xack(self.keys.jobs(delivery.model), GROUP, delivery.entry_id)
        pipe.xdel(self.keys.jobs(delivery.model), delivery.entry_id)
        await pipe.execute()

    async def is_cancelled(self, model: str, request_ids: list[str]) -> list[bool]:
        if not request_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.exists(self.keys.cancel(model, rid))
        return [bool(x) for x in await pipe.execute()]
