"""Fencing: a worker writes for a job only while it still owns that delivery.

A worker frozen (SIGSTOP, a long GC pause, a VM migration) past its heartbeat TTL has its
jobs reclaimed by another worker; when it resumes, it must not publish, log, store, ack,
delete or dead-letter anything for them. Each such write goes through one Lua script that
first looks the job's entry up in the group's pending list: if the entry's consumer is not
this worker, or its delivery count is not the one this worker was handed, the script writes
nothing and says who owns it now. Check and write are one atomic step, so no write of a
worker that lost a job can land after the claim that took it.

The delivery count makes the fence exact even against the worker itself: a job it re-reads
from its own pending list (XCLAIM to itself, one more delivery) fences out the task still
holding the earlier delivery.

The script is sent with EVAL, not EVALSHA: Redis keeps an EVAL's script in its cache too, and
EVAL survives a restart or a failover to a replica that never loaded it (no NOSCRIPT round).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from .keys import GROUP

Command = tuple[Any, ...]

# KEYS[1]: the job stream; KEYS[2..]: the keys the commands touch (the job's {m:NAME} tag).
# ARGV: group, entry id, consumer, delivery count, then each command as its length and words.
_FENCED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local e = p[1]
if not e then return {0, ''} end
if e[2] ~= ARGV[3] or tonumber(e[4]) ~= tonumber(ARGV[4]) then
  return {0, e[2] .. ' ' .. tostring(e[4])}
end
local out = {1}
local i = 5
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local r = redis.call(unpack(ARGV, i + 1, i + n))
  if type(r) == 'table' and r.ok then r = r.ok end
  table.insert(out, r)
  i = i + n + 1
end
return out
"""


class LostDelivery(Exception):
    """This worker no longer owns the job's delivery: another worker reclaimed it (this
    one's heartbeat lapsed), or it was finished or handed back meanwhile."""

    def __init__(self, fence: Fence, owner: str) -> None:
        self.fence = fence
        self.owner = owner  # "CONSUMER DELIVERIES" of the new owner, "" if not pending
        super().__init__(f"job {fence.entry_id}: {self.reason}")

    @property
    def reason(self) -> str:
        if not self.owner:
            return "no longer pending (finished or handed back by its new owner)"
        consumer, _, deliveries = self.owner.partition(" ")
        return f"reclaimed by {consumer} (delivery {deliveries})"


@dataclass(frozen=True)
class Fence:
    """One delivery of one job: the pending entry a worker must still own to write."""

    stream: str
    entry_id: str
    consumer: str
    deliveries: int

    def wrap(self, keys: Sequence[str], commands: Sequence[Command]) -> Command:
        """``commands`` as one fenced EVAL (``keys``: every key they touch)."""
        argv: list[Any] = [GROUP, self.entry_id, self.consumer, self.deliveries]
        for command in commands:
            argv += [len(command), *command]
        return ("EVAL", _FENCED, 1 + len(keys), self.stream, *keys, *argv)

    def unwrap(self, reply: Any) -> list[Any]:
        """The commands' replies; raises :class:`LostDelivery` if nothing was written."""
        if isinstance(reply, Exception):
            raise reply
        if int(reply[0]) == 0:
            raise LostDelivery(self, str(reply[1]))
        return list(reply[1:])

    async def run(
        self, redis: aioredis.Redis, keys: Sequence[str], commands: Sequence[Command]
    ) -> list[Any]:
        """Run ``commands`` now, only while this delivery is still ours."""
        return self.unwrap(await redis.execute_command(*self.wrap(keys, commands)))


async def lost(redis: aioredis.Redis, fences: Sequence[Fence]) -> list[LostDelivery]:
    """The deliveries among ``fences`` this worker no longer owns (one pipeline; a read,
    so not atomic with anything: the writes' own fence is what guarantees)."""
    if not fences:
        return []
    pipe = redis.pipeline(transaction=False)
    for f in fences:
        pipe.xpending_range(f.stream, GROUP, f.entry_id, f.entry_id, 1)
    out = []
    for fence, rows in zip(fences, await pipe.execute(), strict=True):
        row = rows[0] if rows else None
        if row is None:
            out.append(LostDelivery(fence, ""))
        elif row["consumer"] != fence.consumer or row["times_delivered"] != fence.deliveries:
            out.append(LostDelivery(fence, f"{row['consumer']} {row['times_delivered']}"))
    return out
