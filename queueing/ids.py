"""Object ids that sort by creation time, and pages of an index of them.

An id is a prefix (``file-``, ``batch_``), 12 hex digits of the millisecond clock and 12
random ones. Ids made in one process sort in the order they were made, even within one
millisecond (the random part then counts up from the last id's, as a monotonic ULID does).
So an index of them needs no scores: a sorted set's members are read in order with
ZRANGEBYLEX, and a cursor (``after``) still works when the object it names is gone.
"""

from __future__ import annotations

import secrets
import threading

import redis.asyncio as aioredis

ID_DIGITS = 24
_last_id = (0, 0)
_id_lock = threading.Lock()


def sortable_id(prefix: str, now_ms: int) -> str:
    global _last_id
    with _id_lock:
        last_ms, last_rand = _last_id
        if now_ms <= last_ms and last_rand + 1 < 1 << 48:
            now_ms, rand = last_ms, last_rand + 1
        else:
            rand = secrets.randbits(47)
        _last_id = (now_ms, rand)
    return f"{prefix}{now_ms:012x}{rand:012x}"


def is_sortable_id(text: str, prefix: str) -> bool:
    """Whether ``text`` has the shape of an id made with ``prefix`` (anything else is
    unknown, and never reaches a key name)."""
    body = text[len(prefix) :]
    return (
        text.startswith(prefix)
        and len(body) == ID_DIGITS
        and all(c in "0123456789abcdef" for c in body)
    )


async def page_ids(
    redis: aioredis.Redis, index: str, after: str | None, count: int, descending: bool
) -> list[str]:
    """Up to ``count`` ids of ``index`` after the cursor, newest first when ``descending``."""
    if descending:
        high = f"({after}" if after else "+"
        raw = await redis.zrevrangebylex(index, high, "-", start=0, num=count)
    else:
        low = f"({after}" if after else "-"
        raw = await redis.zrangebylex(index, low, "+", start=0, num=count)
    return [r.decode() if isinstance(r, bytes) else r for r in raw]
