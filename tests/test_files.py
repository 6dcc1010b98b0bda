"""The Files API through the official openai client: a real redis-server and a real
`tokenrelay api` process (no worker: files need only Redis and the API)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from tokenrelay.embedded_redis import EmbeddedRedis
from tokenrelay.queueing.files import CHUNK_BYTES

from .openai_errors import assert_error
from .stack import Stack

KEY = "files-test-key"
LIMIT = 5_000_000  # --max-file-size of the shared API
BATCH_LINE = b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


@pytest.fixture(scope="module")
def files_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    s = Stack(redis_server.url, f"f{uuid.uuid4().hex[:8]}")
    s.api("--max-file-size", str(LIMIT), "--api-keys", KEY)
    yield s
    s.stop()


def _client(stack: Stack, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(files_stack: Stack) -> Iterator[openai.OpenAI]:
    c = _client(files_stack)
    yield c
    c.close()


def _file_keys(sync_redis: redis.Redis, stack: Stack, file_id: str) -> list[str]:
    return sorted(sync_redis.scan_iter(f"{stack.prefix}:{{f:{file_id}}}:*"))


def test_create_retrieve_content_delete(client: openai.OpenAI) -> None:
    data = BATCH_LINE * 3
    created = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert created.bytes == len(data) and created.filename == "requests.jsonl"
    assert created.purpose == "batch" and created.status == "processed"
    # OpenAI's default for batch files: they expire 30 days after creation
    assert created.expires_at == created.created_at + 30 * 86400

    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).read() == data
    assert created.id in [f.id for f in client.files.list()]

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as err:
            call(created.id)
        assert err.value.code == "file_not_found" and created.id in err.value.message
    assert created.id not in [f.id for f in client.files.list()]


def test_a_few_megabytes_round_trip_byte_exact(
    client: openai.OpenAI, files_stack: Stack, sync_redis: redis.Redis
) -> None:
    """Over the 1 MiB --max-body-bytes, not UTF-8, several chunks and a partial last one."""
    data = os.urandom(3 * CHUNK_BYTES + 12_345)
    created = client.files.create(file=("blob.bin", data), purpose="batch")
    assert created.bytes == len(data)
    keys = _file_keys(sync_redis, files_stack, created.id)
    assert len([k for k in keys if ":chunk:" in k]) == 4, keys
    assert client.files.content(created.id).read() == data
    client.files.delete(created.id)
    assert _file_keys(sync_redis, files_stack, created.id) == []


def test_expires_after_sets_expires_at_and_ttls(
    client: openai.OpenAI, files_stack: Stack, sync_redis: redis.Redis
) -> None:
    created = client.files.create(
        file=("short.jsonl", BATCH_LINE),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert created.expires_at == created.created_at + 3600
    keys = _file_keys(sync_redis, files_stack, created.id)
    assert len(keys) == 2  # metadata and one chunk
    for key in keys:
        assert sync_redis.expiretime(key) == created.expires_at


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}, "seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "2592001"}, "seconds"),
        ({"expires_after[anchor]": "created_at"}, "seconds"),
        ({"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}, "anchor"),
    ],
)
def test_bad_expires_after_is_a_400(files_stack: Stack, fields: dict[str, str], param: str) -> None:
    r = _post(files_stack, {"purpose": "batch", **fields}, {"file": ("a.jsonl", BATCH_LINE)})
    assert assert_error(r, 400, "invalid_value")["param"] == f"expires_after.{param}"


def test_a_file_over_the_limit_is_a_400_naming_size_and_limit(
    client: openai.OpenAI, files_stack: Stack, sync_redis: redis.Redis
) -> None:
    before = set(sync_redis.scan_iter(f"{files_stack.prefix}:{{f:*"))
    size = LIMIT + 1
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
    assert err.value.code == "file_too_large"
    message = err.value.message
    assert f"{size} bytes" in message and f"{LIMIT} bytes" in message
    assert "--max-file-size" in message
    # nothing of it is left in Redis, and the API still answers
    assert set(sync_redis.scan_iter(f"{files_stack.prefix}:{{f:*")) == before
    assert client.files.create(file=("ok.jsonl", b"x" * LIMIT), purpose="batch").bytes == LIMIT


def test_a_full_redis_is_a_503_and_keeps_nothing(
    client: openai.OpenAI, files_stack: Stack, sync_redis: redis.Redis
) -> None:
    before = set(sync_redis.scan_iter(f"{files_stack.prefix}:{{f:*"))
    used = int(sync_redis.info("memory")["used_memory"])
    old = sync_redis.config_get("maxmemory*")
    sync_redis.config_set("maxmemory-policy", "noeviction")
    sync_redis.config_set("maxmemory", used + 2 * CHUNK_BYTES)
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.files.create(file=("big.bin", b"x" * (4 * CHUNK_BYTES)), purpose="batch")
    finally:
        sync_redis.config_set("maxmemory", old["maxmemory"])
        sync_redis.config_set("maxmemory-policy", old["maxmemory-policy"])
    assert err.value.status_code == 503 and err.value.code == "storage_full"
    assert set(sync_redis.scan_iter(f"{files_stack.prefix}:{{f:*")) == before


@pytest.mark.parametrize("purpose", ["fine-tune", "batch_output", ""])
def test_bad_purpose_is_a_400_naming_the_accepted_value(
    client: openai.OpenAI, purpose: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("a.jsonl", BATCH_LINE), purpose=purpose)  # type: ignore[arg-type]
    assert err.value.param == "purpose" and "'batch'" in err.value.message


def _post(stack: Stack, data: dict[str, str], files: dict[str, object] | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{stack.url}/v1/files", data=data, files=files, headers=headers, timeout=30)


def test_malformed_uploads_are_400s(files_stack: Stack) -> None:
    missing_purpose = _post(files_stack, {}, {"file": ("a.jsonl", BATCH_LINE)})
    assert assert_error(missing_purpose, 400, "invalid_value")["param"] == "purpose"
    no_file = _post(files_stack, {"purpose": "batch"}, {"document": ("a.jsonl", BATCH_LINE)})
    assert assert_error(no_file, 400, "invalid_upload")["param"] == "file"
    headers = {"Authorization": f"Bearer {KEY}"}
    as_json = httpx.post(
        f"{files_stack.url}/v1/files", json={"purpose": "batch"}, headers=headers, timeout=30
    )
    assert "multipart/form-data" in assert_error(as_json, 400, "invalid_upload")["message"]
    cut = httpx.post(
        f"{files_stack.url}/v1/files",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
        headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"},
        timeout=30,
    )
    assert "closing boundary" in assert_error(cut, 400, "invalid_upload")["message"]


def test_keys_are_required(files_stack: Stack, client: openai.OpenAI) -> None:
    created = client.files.create(file=("a.jsonl", BATCH_LINE), purpose="batch")
    base = f"{files_stack.url}/v1/files"
    for method, path in [
        ("POST", ""),
        ("GET", ""),
        ("GET", f"/{created.id}"),
        ("GET", f"/{created.id}/content"),
        ("DELETE", f"/{created.id}"),
    ]:
        r = httpx.request(
            method, base + path, files={"file": ("a", b"x")} if method == "POST" else None
        )
        assert_error(r, 401, "invalid_api_key")
    with _client(files_stack, "wrong-key") as stranger, pytest.raises(openai.AuthenticationError):
        stranger.files.list()
    assert client.files.retrieve(created.id).id == created.id


def test_list_pages_orders_and_skips_expired_files(stack: Stack, sync_redis: redis.Redis) -> None:
    stack.api()
    with _client(stack, "EMPTY") as client:
        ids = [
            client.files.create(file=(f"{i}.jsonl", BATCH_LINE), purpose="batch").id
            for i in range(5)
        ]
        newest_first = client.files.list()
        assert [f.id for f in newest_first.data] == ids[::-1] and not newest_first.has_more

        page = client.files.list(limit=2, order="asc")
        assert [f.id for f in page.data] == ids[:2] and page.has_more
        assert [f.id for f in client.files.list(limit=2, order="asc")] == ids  # pages on
        assert [f.id for f in client.files.list(limit=2, after=ids[3]).data] == [ids[2], ids[1]]

        raw = httpx.get(f"{stack.url}/v1/files", params={"limit": 2, "order": "asc"}).json()
        assert raw["object"] == "list" and raw["has_more"] is True
        assert (raw["first_id"], raw["last_id"]) == (ids[0], ids[1])

        # a cursor still works once its file is deleted
        client.files.delete(ids[1])
        assert [f.id for f in client.files.list(order="asc", after=ids[1])] == ids[2:]

        # a file whose keys expired: the listing skips it and drops its index entry
        sync_redis.delete(f"{stack.prefix}:{{f:{ids[2]}}}:meta")
        assert [f.id for f in client.files.list(order="asc")] == [ids[0], ids[3], ids[4]]
        assert sync_redis.zscore(f"{stack.prefix}:files", ids[2]) is None
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(ids[2])

        assert [f.id for f in client.files.list(purpose="batch_output")] == []


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 10_001}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"limit": "\u00b9"}, "limit"),  # bug: a digit int() refuses ('¹'.isdigit()) was a 500
        ({"order": "newest"}, "order"),
    ],
)
def test_bad_list_parameters_are_400s(
    files_stack: Stack, params: dict[str, object], param: str
) -> None:
    r = httpx.get(
        f"{files_stack.url}/v1/files", params=params, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert assert_error(r, 400, "invalid_value")["param"] == param


def test_unknown_ids_are_404s(files_stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    for file_id in ("file-000000000000000000000000", "file-abc", "{f:x}", "FILE-1"):
        r = httpx.get(f"{files_stack.url}/v1/files/{file_id}", headers=headers)
        assert_error(r, 404, "file_not_found")
