"""The file store behind the Files API: files kept in Redis, so every API process and
every batch job sees the same ones.

A file is a metadata hash and its bytes cut into chunks of ``CHUNK_BYTES``, one string key
each, all under the hash tag ``{f:ID}``; a sorted set indexes the ids. Ids sort by creation
time (``file-`` + the millisecond clock in hex + random hex, ids.py), so the index needs no
scores.

Writing: chunks are written as they arrive, each with ``UPLOAD_TTL_S`` so an upload cut off
midway leaves nothing behind for long; ``commit`` then writes the metadata, gives every key
the file's expiry (or none), and only then adds the id to the index. A file is visible once
committed, never half-written. An expired file's keys vanish by their TTLs; its index entry
is dropped the next time a listing comes across it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from .ids import is_sortable_id, page_ids, sortable_id
from .keys import Keys

# Just under 1 MiB: a string of exactly 1 MiB plus Redis's 10-byte header falls in
# jemalloc's 1.25 MiB size class (measured: 1,310,768 bytes of memory for a 1 MiB value,
# 1,048,624 for one of 1 MiB - 64 B). Large enough that a 200 MB file is 200 keys.
CHUNK_BYTES = (1 << 20) - 64
UPLOAD_TTL_S = 24 * 3600  # chunks of an upload not yet committed
PURPOSES = ("batch", "batch_output")


@dataclass(frozen=True)
class FileInfo:
    id: str
    bytes: int
    created_at: int  # Unix seconds
    filename: str
    purpose: str
    expires_at: int | None
    chunks: int

    def to_hash(self) -> dict[str, str | int]:
        return {
            "id": self.id,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "expires_at": "" if self.expires_at is None else self.expires_at,
            "chunks": self.chunks,
        }

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> FileInfo:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=f["id"],
            bytes=int(f["bytes"]),
            created_at=int(f["created_at"]),
            filename=f["filename"],
            purpose=f["purpose"],
            expires_at=int(f["expires_at"]) if f["expires_at"] else None,
            chunks=int(f["chunks"]),
        )


class FileGone(Exception):
    """The file was deleted or expired while its content was being read."""


def new_file_id(now_ms: int) -> str:
    """``file-`` + 12 hex digits of milliseconds + 12 random ones (see ids.py)."""
    return sortable_id("file-", now_ms)


def is_file_id(text: str) -> bool:
    return is_sortable_id(text, "file-")


class FileWriter:
    """One file being written: ``write`` the bytes as they come, then ``commit`` (or
    ``abort``). Past ``max_bytes`` it stores nothing more and drops what it stored, but
    keeps counting, so the caller can say how large the file was."""

    def __init__(self, store: FileStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        now_ms = int(time.time() * 1000)
        self.id = new_file_id(now_ms)
        self.created_at = now_ms // 1000
        self.size = 0
        self._buffer = bytearray()
        self._chunks = 0

    @property
    def too_large(self) -> bool:
        return 0 < self.max_bytes < self.size

    async def write(self, data: bytes) -> None:
        was_too_large = self.too_large
        self.size += len(data)
        if was_too_large:
            return
        if self.too_large:
            await self.abort()
            return
        self._buffer += data
        while len(self._buffer) >= CHUNK_BYTES:
            await self._flush(bytes(self._buffer[:CHUNK_BYTES]))
            del self._buffer[:CHUNK_BYTES]

    async def _flush(self, chunk: bytes) -> None:
        key = self.store.keys.file_chunk(self.id, self._chunks)
        await self.store.redis.set(key, chunk, ex=UPLOAD_TTL_S)
        self._chunks += 1

    async def commit(self, filename: str, purpose: str, expires_after: int | None) -> FileInfo:
        """Store the rest, the metadata and the expiry (seconds from creation, or None to
        keep the file until deleted), then list the file."""
        if self.too_large:
            raise ValueError(f"the file is over {self.max_bytes} bytes")
        if self._buffer:
            await self._flush(bytes(self._buffer))
            self._buffer.clear()
        expires_at = None if expires_after is None else self.created_at + expires_after
        info = FileInfo(
            self.id, self.size, self.created_at, filename, purpose, expires_at, self._chunks
        )
        keys = self.store.keys
        file_keys = [keys.file_meta(self.id)] + [
            keys.file_chunk(self.id, i) for i in range(info.chunks)
        ]
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.hset(file_keys[0], mapping=info.to_hash())
            for key in file_keys:
                if expires_at is None:
                    pipe.persist(key)
                else:
                    pipe.expireat(key, expires_at)
            await pipe.execute()
        await self.store.redis.zadd(keys.files, {self.id: 0})
        return info

    async def abort(self) -> None:
        """Delete what was written so far (the chunks' TTL would, later), metadata
        included, should a commit have failed after writing it."""
        self._buffer.clear()
        keys = [self.store.keys.file_chunk(self.id, i) for i in range(self._chunks)]
        self._chunks = 0
        await self.store.redis.delete(self.store.keys.file_meta(self.id), *keys)


@dataclass
class FileStore:
    redis: aioredis.Redis  # decode_responses=False: chunks are bytes
    keys: Keys

    def writer(self, max_bytes: int = 0) -> FileWriter:
        """A new file to write; ``max_bytes`` 0 = no limit."""
        return FileWriter(self, max_bytes)

    async def create(
        self, filename: str, purpose: str, data: bytes, expires_after: int | None = None
    ) -> FileInfo:
        """A file from bytes in hand (server-written files such as batch output)."""
        writer = self.writer()
        try:
            await writer.write(data)
            return await writer.commit(filename, purpose, expires_after)
        except BaseException:
            await writer.abort()
            raise

    async def get(self, file_id: str) -> FileInfo | None:
        if not is_file_id(file_id):
            return None
        raw = await self.redis.hgetall(self.keys.file_meta(file_id))
        return FileInfo.from_hash(raw) if raw else None

    async def content(self, info: FileInfo) -> AsyncIterator[bytes]:
        """The file's bytes, one chunk at a time; FileGone if a chunk has vanished."""
        for i in range(info.chunks):
            chunk = await self.redis.get(self.keys.file_chunk(info.id, i))
            if chunk is None:
                raise FileGone(info.id)
            yield chunk

    async def delete(self, file_id: str) -> bool:
        """Delete a file; False when there was none."""
        info = await self.get(file_id)
        if info is None:
            return False
        chunks = [self.keys.file_chunk(file_id, i) for i in range(info.chunks)]
        await self.redis.delete(self.keys.file_meta(file_id), *chunks)
        await self.redis.zrem(self.keys.files, file_id)
        return True

    async def list(
        self,
        limit: int,
        descending: bool = True,
        after: str | None = None,
        purpose: str | None = None,
    ) -> tuple[list[FileInfo], bool]:
        """Up to ``limit`` files after the cursor id, newest first when ``descending``,
        and whether there are more. Index entries whose file is gone are removed."""
        found: list[FileInfo] = []
        cursor = after
        while len(found) <= limit:
            want = max(limit + 1 - len(found), 64)
            ids = await self._ids(cursor, want, descending)
            if not ids:
                break
            cursor = ids[-1]
            async with self.redis.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(self.keys.file_meta(file_id))
                metas = await pipe.execute()
            gone = [i for i, meta in zip(ids, metas, strict=True) if not meta]
            if gone:
                await self.redis.zrem(self.keys.files, *gone)
            infos = (FileInfo.from_hash(meta) for meta in metas if meta)
            found += [f for f in infos if purpose is None or f.purpose == purpose]
            if len(ids) < want:
                break
        return found[:limit], len(found) > limit

    async def _ids(self, after: str | None, count: int, descending: bool) -> list[str]:
        return await page_ids(self.redis, self.keys.files, after, count, descending)
