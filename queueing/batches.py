"""The batch store behind the Batch API: batches and their line progress, kept in Redis.

A batch is a metadata hash (``Batch`` below: status, timestamps, counts, file ids) and, while
it runs, a hash of its finished lines (line number -> the output line, JSON), both under the
hash tag ``{b:ID}``. A sorted set indexes the ids (they sort by creation time, ids.py); a
set holds the batches that have not ended, for status and metrics.

Every status change is one script that checks the status it leaves, so the API's cancel and
the runner's progress never overwrite each other. A finished line is written with HSETNX
and counted in the same script, so a runner that resumes after a crash cannot count or
output a line twice. A lease key (SET NX PX, refreshed) lets one runner at a time work on a
batch: RQ may start a retry while the old run is still alive (its worker was lost, not its
work horse).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from .ids import is_sortable_id, page_ids, sortable_id
from .keys import Keys

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
ENDED: tuple[BatchStatus, ...] = ("failed", "completed", "expired", "cancelled")
ID_PREFIX = "batch_"
KEEP_ENDED_S = 30 * 86400  # an ended batch's record lives as long as its output files
TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_STATUS_AT = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


class LineError(BaseModel):
    """One problem of the input file, as OpenAI's batch ``errors.data`` items."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None  # 1-based line of the input file


class Batch(BaseModel):
    """A batch as stored; ``api/batches.py`` renders it as OpenAI's batch object."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None  # seconds; None = the default of 30 days
    model: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[LineError] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    # files being written at the end: a runner that resumes finds and reuses them
    pending_files: dict[str, str] = Field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> Batch:
        data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
        for name in ("metadata", "errors", "pending_files"):
            if name in data:
                data[name] = json.loads(data[name])
        return cls.model_validate(data)


def to_hash(fields: dict[str, Any]) -> dict[str, str]:
    """Fields as hash values: None is "", lists and dicts are JSON."""
    out = {}
    for name, value in fields.items():
        if value is None:
            out[name] = ""
        elif isinstance(value, list | dict):
            out[name] = json.dumps(to_jsonable_python(value))
        else:
            out[name] = str(value)
    return out


def is_batch_id(text: str) -> bool:
    return is_sortable_id(text, ID_PREFIX)


# KEYS: meta, active set, lines. ARGV: allowed statuses (comma-separated), new status, keep
# (seconds an ended record lives), then field/value pairs. Returns {1, new} or {0, current}.
MOVE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return {0, ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == current then allowed = true end
end
if not allowed then return {0, current} end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[2] == 'failed' or ARGV[2] == 'completed' or ARGV[2] == 'expired'
    or ARGV[2] == 'cancelled' then
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return {1, ARGV[2]}
"""

# KEYS: meta, lines. ARGV: line number, output line, counter (completed|failed), input
# tokens, output tokens. Only the first record of a line counts.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
redis.call('HINCRBY', KEYS[1], 'input_tokens', tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[1], 'output_tokens', tonumber(ARGV[5]))
return 1
"""

# KEYS: meta, active set, lease. ARGV: now, keep. A batch no runner holds yet is cancelled at
# once (its RQ job finds it ended); one being run is marked cancelling, for its runner.
_CANCEL = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return '' end
if current == 'validating' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelling_at', ARGV[1],
    'cancelled_at', ARGV[1])
  redis.call('SREM', KEYS[2], redis.call('HGET', KEYS[1], 'id'))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 'cancelled'
end
if current == 'validating' or current == 'in_progress' then
  redis.call('HSET', KEYS[1], 'status', 'cancelling', 'cancelling_at', ARGV[1])
  return 'cancelling'
end
return current
"""

_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Recorded:
    line: int
    ok: bool
    text: str  # the output line's JSON


class BatchStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis  # decode_responses=True
        self.keys = keys
        self._move = redis.register_script(MOVE_SCRIPT)
        self._record = redis.register_script(_RECORD)
        self._refresh = redis.register_script(_REFRESH)
        self._release = redis.register_script(_RELEASE)
        self._cancel = redis.register_script(_CANCEL)

    @staticmethod
    def new_id() -> str:
        return sortable_id(ID_PREFIX, int(time.time() * 1000))

    async def create(self, batch: Batch) -> None:
        fields = to_hash(batch.model_dump())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.batch(batch.id), mapping=fields)
            pipe.sadd(self.keys.active_batches, batch.id)
            pipe.zadd(self.keys.batches, {batch.id: 0})
            await pipe.execute()

    async def delete(self, batch_id: str) -> None:
        """Forget a batch (one whose RQ job could not be queued)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.batch(batch_id), self.keys.batch_lines(batch_id))
            pipe.srem(self.keys.active_batches, batch_id)
            pipe.zrem(self.keys.batches, batch_id)
            await pipe.execute()

    async def get(self, batch_id: str) -> Batch | None:
        if not is_batch_id(batch_id):
            return None
        raw = await self.redis.hgetall(self.keys.batch(batch_id))
        return Batch.from_hash(raw) if raw else None

    async def status(self, batch_id: str) -> BatchStatus | None:
        return await self.redis.hget(self.keys.batch(batch_id), "status")  # type: ignore[no-any-return]

    async def move(
        self, batch_id: str, allowed: tuple[str, ...], new: BatchStatus, **fields: Any
    ) -> tuple[bool, str]:
        """Set ``new`` (and its ``*_at`` timestamp, and ``fields``) if the status is one of
        ``allowed``; (moved, the status now). An ended batch leaves the active set, loses
        its line records and expires after ``KEEP_ENDED_S``."""
        if new in _STATUS_AT:
            fields.setdefault(_STATUS_AT[new], int(time.time()))
        pairs = [x for kv in to_hash(fields).items() for x in kv]
        keys = [
            self.keys.batch(batch_id),
            self.keys.active_batches,
            self.keys.batch_lines(batch_id),
        ]
        moved, now = await self._move(
            keys=keys, args=[",".join(allowed), new, KEEP_ENDED_S, *pairs]
        )
        return bool(moved), now

    async def cancel(self, batch_id: str) -> str:
        """Ask for a batch to be cancelled; the status it has now ("" if there is none)."""
        keys = [
            self.keys.batch(batch_id),
            self.keys.active_batches,
            self.keys.batch_lease(batch_id),
        ]
        return str(await self._cancel(keys=keys, args=[int(time.time()), KEEP_ENDED_S]))

    async def update(self, batch_id: str, **fields: Any) -> None:
        await self.redis.hset(self.keys.batch(batch_id), mapping=to_hash(fields))

    async def record(
        self, batch_id: str, line: int, text: str, ok: bool, usage: tuple[int, int] = (0, 0)
    ) -> bool:
        """Keep a finished line's output and count it; False if it was already kept."""
        keys = [self.keys.batch(batch_id), self.keys.batch_lines(batch_id)]
        counter = "completed" if ok else "failed"
        args = [line, ("1" if ok else "0") + text, counter, *usage]
        return int(await self._record(keys=keys, args=args)) == 1

    async def recorded(self, batch_id: str) -> list[Recorded]:
        """Every finished line, in line order."""
        raw = await self.redis.hgetall(self.keys.batch_lines(batch_id))
        found = [Recorded(int(k), v[:1] == "1", v[1:]) for k, v in raw.items()]
        return sorted(found, key=lambda r: r.line)

    async def recorded_lines(self, batch_id: str) -> set[int]:
        return {int(k) for k in await self.redis.hkeys(self.keys.batch_lines(batch_id))}

    async def list(self, limit: int, after: str | None = None) -> tuple[list[Batch], bool]:
        """Up to ``limit`` batches after the cursor id, newest first, and whether there are
        more. Index entries whose record has expired are removed."""
        found: list[Batch] = []
        cursor = after
        while len(found) <= limit:
            want = max(limit + 1 - len(found), 64)
            ids = await page_ids(self.redis, self.keys.batches, cursor, want, descending=True)
            if not ids:
                break
            cursor = ids[-1]
            async with self.redis.pipeline(transaction=False) as pipe:
                for batch_id in ids:
                    pipe.hgetall(self.keys.batch(batch_id))
                metas = await pipe.execute()
            gone = [i for i, meta in zip(ids, metas, strict=True) if not meta]
            if gone:
                await self.redis.zrem(self.keys.batches, *gone)
            found += [Batch.from_hash(meta) for meta in metas if meta]
            if len(ids) < want:
                break
        return found[:limit], len(found) > limit

    async def active(self) -> list[Batch]:
        """The batches that have not ended, oldest first."""
        ids = sorted(await self.redis.smembers(self.keys.active_batches))
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in ids:
                pipe.hgetall(self.keys.batch(batch_id))
            metas = await pipe.execute()
        return [Batch.from_hash(meta) for meta in metas if meta]

    # the runner's lease: one runner at a time per batch
    async def acquire(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        key = self.keys.batch_lease(batch_id)
        if await self.redis.set(key, token, nx=True, px=ttl_ms):
            return True
        return await self.refresh(batch_id, token, ttl_ms)

    async def refresh(self, batch_id: str, token: str, ttl_ms: int) -> bool:
        key = self.keys.batch_lease(batch_id)
        return int(await self._refresh(keys=[key], args=[token, ttl_ms])) == 1

    async def release(self, batch_id: str, token: str) -> None:
        await self._release(keys=[self.keys.batch_lease(batch_id)], args=[token])

    async def leased(self, batch_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.batch_lease(batch_id)))
