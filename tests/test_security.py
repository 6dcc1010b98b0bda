"""Security: API keys from env and file, per-key rate limits shared through Redis, request
bounds, no raw key in Redis, and least-privilege Redis ACL users for the API, the workers and
the batch workers.

Real processes throughout: a real redis-server, `tokenrelay api` and fake workers.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from tokenrelay.embedded_redis import EmbeddedRedis

from .batch_files import chat_line, start, wait_for
from .openai_errors import assert_error
from .stack import Stack

HELLO = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "fake", "messages": HELLO, "max_tokens": 4}

# The least-privilege users the README documents (keep the two in step).
ACL_API = (
    "-@all +ping +evalsha +eval +script|load +wait +xadd +xlen +xrange +get +set "
    "+mget +smembers +srem +zscore +subscribe +unsubscribe +incrby +pttl +pexpire "
    "+zrangebyscore +xpending +xinfo|groups "
    "+hset +hgetall +persist +expireat +multi +exec +del +zadd +zrem +zrangebylex "
    "+zrevrangebylex +sadd +hget +exists +rpush +info +expire +llen +zcount"
)
ACL_WORKER = (
    "-@all +ping +evalsha +eval +script|load +multi +exec +xreadgroup +xack "
    "+xdel +xgroup|create +xpending +xclaim +xadd +xlen +expire +publish +exists +set +del "
    "+sadd +srem +zadd"
)
ACL_BATCH = "+@all -@dangerous +info"


def chat(stack: Stack, key: str | None = None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{stack.url}/v1/chat/completions", json={**CHAT, **body}, headers=headers, timeout=30
    )


# API keys


def test_keys_from_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_API_KEYS", "env-key-1, env-key-2")
    stack.api()
    stack.fake_worker()
    assert chat(stack, "env-key-1").status_code == 200
    assert chat(stack, "env-key-2").status_code == 200
    assert_error(chat(stack, "env-key-3"), 401, "invalid_api_key")
    assert_error(chat(stack), 401, "invalid_api_key")


def test_keys_from_file(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_API_KEYS", raising=False)
    path = tmp_path / "keys"
    path.write_text("# team a\nfile-key-a\n\n  file-key-b   # team b, trailing comment\n")
    path.chmod(0o600)
    stack.api("--api-keys-file", str(path))
    stack.fake_worker()
    assert chat(stack, "file-key-a").status_code == 200
    assert chat(stack, "file-key-b").status_code == 200
    for wrong in ("# team a", "file-key-b   # team b, trailing comment", "file-key", "nope"):
        assert_error(chat(stack, wrong), 401, "invalid_api_key")
    assert_error(chat(stack), 401, "invalid_api_key")

    # the same file through the environment variable
    other = Stack(stack.redis_url, stack.prefix)
    try:
        monkeypatch.setenv("TOKENRELAY_API_KEYS_FILE", str(path))
        other.api()
        assert chat(other, "file-key-a").status_code == 200
        assert_error(chat(other, "wrong"), 401, "invalid_api_key")
    finally:
        other.stop()


def test_empty_keys_file_refuses_to_start(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# nothing yet\n\n")
    proc = stack._spawn("api", "--port", "1", "--api-keys-file", str(path))
    assert proc.popen.wait(30) != 0
    assert "holds no key" in proc.output()
    proc = stack._spawn("api", "--port", "1", "--api-keys-file", str(tmp_path / "missing"))
    assert proc.popen.wait(30) != 0
    assert "cannot read the API keys file" in proc.output()


# rate limits


def assert_rate_limited(r: httpx.Response) -> None:
    err = assert_error(r, 429, "rate_limit_exceeded")
    assert err["type"] == "rate_limit_exceeded"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60, retry


def test_rpm_shared_by_two_apis(stack: Stack, sync_redis: redis.Redis) -> None:
    second = Stack(stack.redis_url, stack.prefix)
    try:
        stack.api("--api-keys", "rpm-key-1,rpm-key-2", "--rate-limit-rpm", "4")
        second.api("--api-keys", "rpm-key-1,rpm-key-2", "--rate-limit-rpm", "4")
        stack.fake_worker()
        # 4 requests per minute for this key, alternating between the two API processes
        for i in range(4):
            r = chat(stack if i % 2 else second, "rpm-key-1")
            assert r.status_code == 200, (i, r.text)
        assert_rate_limited(chat(stack, "rpm-key-1"))
        assert_rate_limited(chat(second, "rpm-key-1"))
        # a refused request charges nothing and another key has its own window
        for _ in range(4):
            assert chat(second, "rpm-key-2").status_code == 200
        assert_rate_limited(chat(stack, "rpm-key-2"))
        # health and the model list are not limited
        assert httpx.get(f"{stack.url}/health", timeout=10).status_code == 200
        r = httpx.get(
            f"{stack.url}/v1/models", headers={"Authorization": "Bearer rpm-key-1"}, timeout=10
        )
        assert r.status_code == 200

        # the counters: under the prefix, with a TTL, named by a hash, never the key
        keys = sorted(sync_redis.scan_iter(f"{stack.prefix}:*"))
        limit_keys = [k for k in keys if "{rl:" in k]
        assert len(limit_keys) == 2, keys  # one rpm counter per API key
        for k in limit_keys:
            assert 0 < sync_redis.ttl(k) <= 60
        for k in keys:
            assert "rpm-key" not in k, k
    finally:
        second.stop()


def test_rpm_per_ip_without_keys(stack: Stack) -> None:
    stack.api("--rate-limit-rpm", "2")
    stack.fake_worker()
    assert chat(stack).status_code == 200
    assert chat(stack, "anything").status_code == 200
    assert_rate_limited(chat(stack))


def test_tpm(stack: Stack) -> None:
    # charged at admission: prompt chars / 4 + 1 + n * max_tokens
    stack.api("--api-keys", "tpm-key", "--rate-limit-tpm", "100")
    stack.fake_worker()
    assert chat(stack, "tpm-key", max_tokens=40).status_code == 200  # ~43
    assert chat(stack, "tpm-key", max_tokens=40).status_code == 200  # ~86
    r = chat(stack, "tpm-key", max_tokens=40)
    assert_rate_limited(r)
    assert "tokens per minute" in r.json()["error"]["message"]
    assert chat(stack, "tpm-key", max_tokens=5).status_code == 200  # still fits
    # a request larger than the whole budget says so
    r = chat(stack, "tpm-key", max_tokens=20, n=8)
    assert_rate_limited(r)
    assert "Request too large" in r.json()["error"]["message"]


def test_no_raw_key_in_redis(stack: Stack, redis_server: EmbeddedRedis) -> None:
    secret = f"sk-secret-{uuid.uuid4().hex}"
    stack.api("--api-keys", secret, "--rate-limit-rpm", "100", "--rate-limit-tpm", "100000")
    stack.fake_worker()
    for stream in (False, True):
        r = chat(stack, secret, stream=stream)
        assert r.status_code == 200, r.text
    # read as bytes: the Redis is shared with the Files API's tests, whose chunks are binary
    raw = redis.Redis.from_url(redis_server.url)
    needle = secret.encode()
    for key in raw.scan_iter("*"):
        assert needle not in key, key
        kind = raw.type(key)
        if kind == b"string":
            assert needle not in (raw.get(key) or b""), key
        elif kind == b"stream":
            assert needle not in str(raw.xrange(key)).encode(), key
        elif kind == b"hash":
            assert needle not in b"".join(k + v for k, v in raw.hgetall(key).items()), key
    raw.close()


# bounds


def test_body_too_large(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=big, timeout=30)
    err = assert_error(r, 400, "body_too_large")
    assert "1048576 bytes" in err["message"]

    # no Content-Length (chunked): refused while reading
    def chunks() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 65536

    r = httpx.post(f"{stack.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert_error(r, 400, "body_too_large")
    # the server still answers
    assert chat(stack).status_code == 200


def test_body_limit_flag(stack: Stack) -> None:
    stack.api("--max-body-bytes", "2000")
    stack.fake_worker()
    assert chat(stack).status_code == 200
    r = chat(stack, messages=[{"role": "user", "content": "y" * 3000}])
    assert_error(r, 400, "body_too_large")


def test_prompt_too_long(stack: Stack) -> None:
    stack.api("--max-prompt-chars", "1000")
    stack.fake_worker()
    assert chat(stack, messages=[{"role": "user", "content": "a" * 1000}]).status_code == 200
    msgs = [{"role": "user", "content": "a" * 600}, {"role": "assistant", "content": "b" * 600}]
    err = assert_error(chat(stack, messages=msgs), 400, "prompt_too_long")
    assert err["param"] == "messages"
    parts = [{"role": "user", "content": [{"type": "text", "text": "c" * 1001}]}]
    assert_error(chat(stack, messages=parts), 400, "prompt_too_long")
    r = httpx.post(
        f"{stack.url}/v1/completions",
        json={"model": "fake", "prompt": "p" * 1001, "max_tokens": 4},
        timeout=30,
    )
    assert assert_error(r, 400, "prompt_too_long")["param"] == "prompt"


def test_default_prompt_bound(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    big = [{"role": "user", "content": "z" * 200_001}]
    assert_error(chat(stack, messages=big), 400, "prompt_too_long")


def test_stop_sequence_length(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    assert chat(stack, stop=["s" * 256]).status_code == 200
    err = assert_error(chat(stack, stop=["s" * 257]), 400, "invalid_value")
    assert "256" in err["message"]


# Redis with a password and ACL users


@pytest.fixture
def acl_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis().start()
    admin = redis.Redis(port=server.port, decode_responses=True)
    admin.execute_command(
        "ACL", "SETUSER", "tr-api", "on", ">api-pass", "resetkeys", "~tr:*", "~rq:*",
        "resetchannels", "&tr:*", *ACL_API.split(),
    )  # fmt: skip
    admin.execute_command(
        "ACL", "SETUSER", "tr-worker", "on", ">worker-pass", "resetkeys", "~tr:*",
        "resetchannels", "&tr:*", *ACL_WORKER.split(),
    )  # fmt: skip
    admin.execute_command(
        "ACL", "SETUSER", "tr-batch", "on", ">batch-pass", "resetkeys", "~tr:*", "~rq:*",
        "resetchannels", "&tr:*", "&rq:*", *ACL_BATCH.split(),
    )  # fmt: skip
    admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pass", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    admin.close()
    yield server
    server.stop()


def test_rediss_url_is_accepted() -> None:
    from tokenrelay.queueing.connection import RedisSettings, connect

    client = connect(RedisSettings(url="rediss://tr-api:p%40ss@redis.internal:6380/0"))
    pool = client.connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"
    assert pool.connection_kwargs["username"] == "tr-api"
    assert pool.connection_kwargs["password"] == "p@ss"
    assert pool.connection_kwargs["port"] == 6380


def test_acl_users_serve_a_request(acl_redis: EmbeddedRedis) -> None:
    port = acl_redis.port
    admin = redis.Redis.from_url(
        f"redis://admin:admin-pass@127.0.0.1:{port}/0", decode_responses=True
    )
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()  # the default user is off
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(f"redis://tr-api:api-pass@127.0.0.1:{port}/0").flushall()

    api = Stack(f"redis://tr-api:api-pass@127.0.0.1:{port}/0", "tr")
    worker = Stack(f"redis://tr-worker:worker-pass@127.0.0.1:{port}/0", "tr")
    batch = Stack(f"redis://tr-batch:batch-pass@127.0.0.1:{port}/0", "tr")
    try:
        api.api("--api-keys", "acl-key", "--rate-limit-rpm", "50", "--rate-limit-tpm", "10000")
        proc = worker.fake_worker(wait=False)
        batch_worker = batch.batch_worker(wait=False)
        deadline = time.monotonic() + 60
        while not any(admin.exists(f"tr:worker:{i}") for i in admin.smembers("tr:workers")):
            assert proc.alive(), proc.output()
            assert time.monotonic() < deadline, proc.output()
            time.sleep(0.1)
        r = chat(api, "acl-key")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        r = chat(api, "acl-key", stream=True)
        assert r.status_code == 200 and "[DONE]" in r.text, r.text
        r = httpx.get(f"{api.url}/v1/models", headers={"Authorization": "Bearer acl-key"})
        assert [m["id"] for m in r.json()["data"]] == ["fake"]
        # the operator's views read the same keys through the API's user
        r = httpx.get(f"{api.url}/v1/status", headers={"Authorization": "Bearer acl-key"})
        assert r.status_code == 200, r.text
        assert [m["name"] for m in r.json()["models"]] == ["fake"]
        r = httpx.get(f"{api.url}/metrics")
        assert r.status_code == 200 and 'tokenrelay:workers{model="fake"} 1.0' in r.text
        # the Files API's commands are in the API user's list too
        auth = {"Authorization": "Bearer acl-key"}
        r = httpx.post(
            f"{api.url}/v1/files",
            headers=auth,
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", b'{"custom_id": "a"}\n')},
        )
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = httpx.get(f"{api.url}/v1/files/{file_id}/content", headers=auth)
        assert r.content == b'{"custom_id": "a"}\n'
        assert [f["id"] for f in httpx.get(f"{api.url}/v1/files", headers=auth).json()["data"]] == [
            file_id
        ]
        assert httpx.delete(f"{api.url}/v1/files/{file_id}", headers=auth).json()["deleted"]
        # a batch: the API's user queues it on RQ, the batch worker's runs it
        batch.wait_batch_workers(1, batch_worker)
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="acl-key", max_retries=0)
        done = wait_for(client, start(client, [chat_line("a", "fake", "hi", max_tokens=2)]).id)
        assert done.status == "completed" and done.output_file_id, done
        r = httpx.get(f"{api.url}/v1/status", headers=auth)
        assert r.json()["batches"]["queue"]["workers"] == 1, r.text
        for p in api.processes + worker.processes + batch.processes:
            assert "NOPERM" not in p.output() and "no permissions" not in p.output(), p.output()
    finally:
        batch.stop()
        worker.stop()
        api.stop()
        admin.close()


def test_a_command_redis_refuses_is_a_503_naming_the_acl(acl_redis: EmbeddedRedis) -> None:
    """Bug: an API user without the Batch API's rights got 'The job queue (Redis) is
    unreachable' for POST /v1/batches: an ACL refusal now says so, and where the fix is."""
    from tokenrelay.api.service import redis_down

    worker = redis.Redis.from_url(f"redis://tr-worker:worker-pass@127.0.0.1:{acl_redis.port}/0")
    refused = []
    with pytest.raises(redis.RedisError) as err:
        worker.hgetall("tr:x")  # not in the worker's list
    refused.append(err.value)
    with pytest.raises(redis.RedisError) as err:  # nor from a script
        worker.register_script("return redis.call('HGETALL', KEYS[1])")(keys=["tr:x"])
    refused.append(err.value)
    with pytest.raises(redis.RedisError) as err:
        with worker.pipeline(transaction=False) as pipe:
            pipe.set("tr:y", 1).hgetall("tr:x").execute()
    refused.append(err.value)
    for exc in refused:
        answer = redis_down(exc)
        assert (answer.status, answer.code) == (503, "redis_no_permission"), exc
        assert "Security" in answer.message
    worker.close()
