"""Queue messages are versioned and schema-checked by workers; no pickle anywhere. Across a
rolling upgrade a worker runs jobs with fields from a later release, refuses those that
need what it does not know, and tells their clients (queueing/messages.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import Chunk, Result

from ..stack import Stack

BAD = {
    "newer version": {"v": 2},
    "missing field": {"model": None},
    "wrong type": {"stream": "sometimes"},
}


def _job(rid: str, **changes: object) -> str:
    job = {
        "v": 1,
        "id": rid,
        "model": "fake",
        "kind": "completion",
        "prompt": "hi",
        "params": {"max_tokens": 3},
        "stream": False,
        "created": int(time.time()),
        "deadline": time.time() + 30,
    }
    job.update(changes)
    return json.dumps({k: v for k, v in job.items() if v is not None})


async def test_worker_dead_letters_bad_messages_and_lives_on(
    stack: Stack, aredis: aioredis.Redis
) -> None:
    stack.api()
    worker = stack.fake_worker()
    keys = Keys(stack.prefix)
    payloads = [_job(f"bad-{i}", **c) for i, c in enumerate(BAD.values())]
    payloads += ["not json", "\x80\x04\x95pickle-ish bytes"]
    for p in payloads:
        await aredis.xadd(keys.jobs("fake"), {"job": p})
    async with asyncio.timeout(60):  # a hang guard, not a speed
        while await aredis.xlen(keys.dead_letters("fake")) < len(payloads):
            await asyncio.sleep(0.1)
    dead = await aredis.xrange(keys.dead_letters("fake"))
    assert len(dead) == len(payloads), dead
    assert all(f["reason"].startswith("malformed job") for _, f in dead)
    assert await aredis.xlen(keys.jobs("fake")) == 0
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        r = await client.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 200 and worker.alive()


async def _chunks(aredis: aioredis.Redis, keys: Keys, rid: str) -> list[Chunk]:
    """The request's chunk log, once it holds the last chunk."""
    async with asyncio.timeout(60):  # a hang guard, not a speed
        while True:
            entries = await aredis.xrange(keys.chunk_log("fake", rid))
            chunks = [Chunk.model_validate_json(f["c"]) for _, f in entries]
            if chunks and (chunks[-1].done or chunks[-1].error):
                return chunks
            await asyncio.sleep(0.1)


async def test_a_job_from_a_later_release_runs_and_one_it_cannot_run_is_refused_aloud(
    stack: Stack, aredis: aioredis.Redis
) -> None:
    """A job with fields this release does not know (top level and in params) runs; one
    that needs an unknown output-changing field, or is of a newer protocol version, is
    dead-lettered with its reason, and its client gets a worker_outdated error."""
    stack.fake_worker()
    keys = Keys(stack.prefix)
    future = json.loads(_job("future-ok", priority_hint=3, tags=["x"]))
    future["params"]["future_sampler"] = {"strength": 0.5}
    await aredis.xadd(keys.jobs("fake"), {"job": json.dumps(future)})
    needs = _job("future-needs", needs=["max_tokens", "frobnication_penalty"])
    await aredis.xadd(keys.jobs("fake"), {"job": needs})
    await aredis.xadd(keys.jobs("fake"), {"job": _job("future-v2", v=2)})

    ok = await _chunks(aredis, keys, "future-ok")
    assert ok[-1].done and ok[-1].error is None and ok[-1].usage.completion_tokens == 3
    for rid, says in (("future-needs", "frobnication_penalty"), ("future-v2", "version 2")):
        error = (await _chunks(aredis, keys, rid))[-1].error
        assert error is not None and error.code == "worker_outdated" and error.status == 503
        assert says in error.message and "upgrade" in error.message
    reasons = [f["reason"] for _, f in await aredis.xrange(keys.dead_letters("fake"))]
    assert any("frobnication_penalty" in r and r.startswith("refused") for r in reasons)
    assert any("version 2" in r for r in reasons)


def test_an_api_of_today_reads_chunks_and_results_from_a_later_worker() -> None:
    chunk = {"v": 1, "id": "r", "seq": 0, "choices": [{"index": 0, "text": "hi", "tone": 1}],
             "done": True, "usage": {"prompt_tokens": 1, "completion_tokens": 1,
             "total_tokens": 2, "cached_tokens": 0}, "trace": {"gpu": "h200"}}  # fmt: skip
    parsed = Chunk.model_validate_json(json.dumps(chunk))
    assert parsed.choices[0].text == "hi" and parsed.done and parsed.usage.total_tokens == 2
    result = Result.model_validate_json(json.dumps({**chunk, "seq": None}))
    assert result.choices[0].text == "hi"


# An import or a call; the word in prose ("JSON, never pickle") is fine.
USES_PICKLE = r"(import|from) +(c?pickle|cloudpickle|dill)\b|pickle\.(loads?|dumps?)\("


def test_no_pickle_anywhere() -> None:
    root = Path(__file__).resolve().parents[2]
    found = subprocess.run(
        ["git", "grep", "-n", "-E", USES_PICKLE, "--", "*.py", ":!tests/workers/test_protocol.py"],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert not found, found
