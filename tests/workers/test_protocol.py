"""Queue messages are versioned and schema-checked by workers; no pickle anywhere."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tokenrelay.queueing.keys import Keys

from ..stack import Stack

BAD = {
    "wrong version": {"v": 2},
    "unknown field": {"surprise": True},
    "missing field": {"model": None},
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
