"""The file store against a real Redis: chunking, commit and abort, expiry, listing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from tokenrelay.queueing.connection import RedisSettings, connect
from tokenrelay.queueing.files import CHUNK_BYTES, UPLOAD_TTL_S, FileStore, is_file_id


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[FileStore]:
    client = connect(redis_settings, decode_responses=False)
    yield FileStore(client, redis_settings.keys)
    await client.aclose()


async def _chunk_lengths(store: FileStore, file_id: str, count: int) -> list[int | None]:
    keys = [store.keys.file_chunk(file_id, i) for i in range(count)]
    return [await store.redis.strlen(k) or None for k in keys]


async def test_bytes_are_cut_into_chunks_whatever_pieces_they_arrive_in(store: FileStore) -> None:
    data = os.urandom(2 * CHUNK_BYTES + 10)
    writer = store.writer()
    for start in range(0, len(data), 300_007):  # pieces that straddle chunk boundaries
        await writer.write(data[start : start + 300_007])
    # full chunks are in Redis before the commit, with the upload TTL
    assert await _chunk_lengths(store, writer.id, 3) == [CHUNK_BYTES, CHUNK_BYTES, None]
    assert 0 < await store.redis.ttl(store.keys.file_chunk(writer.id, 0)) <= UPLOAD_TTL_S
    assert await store.get(writer.id) is None  # not visible before the commit

    info = await writer.commit("d.bin", "batch", None)
    assert (info.bytes, info.chunks) == (len(data), 3)
    assert await _chunk_lengths(store, info.id, 4) == [CHUNK_BYTES, CHUNK_BYTES, 10, None]
    assert await store.redis.ttl(store.keys.file_chunk(info.id, 0)) == -1  # kept until deleted
    assert b"".join([c async for c in store.content(info)]) == data
    assert await store.get(info.id) == info


async def test_a_writer_past_its_limit_keeps_counting_and_stores_nothing(store: FileStore) -> None:
    writer = store.writer(max_bytes=CHUNK_BYTES + 5)
    await writer.write(b"a" * CHUNK_BYTES)
    assert await _chunk_lengths(store, writer.id, 1) == [CHUNK_BYTES]
    await writer.write(b"b" * 10)
    await writer.write(b"c" * 10)
    assert writer.too_large and writer.size == CHUNK_BYTES + 20
    assert await _chunk_lengths(store, writer.id, 1) == [None]
    with pytest.raises(ValueError):
        await writer.commit("x", "batch", None)


async def test_abort_deletes_the_chunks_written(store: FileStore) -> None:
    writer = store.writer()
    await writer.write(os.urandom(CHUNK_BYTES * 2))
    await writer.abort()
    assert await _chunk_lengths(store, writer.id, 2) == [None, None]


async def test_expiry_is_on_every_key_of_the_file(store: FileStore) -> None:
    info = await store.create("e.jsonl", "batch_output", b"z" * (CHUNK_BYTES + 1), 3600)
    assert info.expires_at == info.created_at + 3600
    keys = [store.keys.file_meta(info.id)] + [store.keys.file_chunk(info.id, i) for i in (0, 1)]
    for key in keys:
        assert await store.redis.expiretime(key) == info.expires_at


async def test_an_empty_file_has_no_chunks(store: FileStore) -> None:
    info = await store.create("empty.jsonl", "batch", b"")
    assert (info.bytes, info.chunks) == (0, 0)
    assert [c async for c in store.content(info)] == []


async def test_ids_sort_by_creation_and_listing_pages_past_gone_files(store: FileStore) -> None:
    ids = [(await store.create(f"{i}", "batch", b"x")).id for i in range(6)]
    assert all(is_file_id(i) for i in ids) and ids == sorted(ids)
    await store.redis.delete(store.keys.file_meta(ids[1]), store.keys.file_meta(ids[2]))
    found, more = await store.list(2, descending=False)
    assert [f.id for f in found] == [ids[0], ids[3]] and more
    assert await store.redis.zcard(store.keys.files) == 4  # the gone ones dropped
    found, more = await store.list(10, descending=True, after=ids[4])
    assert [f.id for f in found] == [ids[3], ids[0]] and not more
    assert await store.delete(ids[5]) and not await store.delete(ids[5])
