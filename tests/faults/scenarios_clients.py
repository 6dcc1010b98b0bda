"""Scenarios 4 and 11: slow readers, and clients hanging up at random under load."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time

import httpx

from ..stack import Stack
from .client import body, bounded, finish, http_client, request
from .ledger import Outcome, Summary

# ---------------------------------------------------------------------------------------------
# 4. Slow readers


async def _slow_read(client: httpx.AsyncClient, out: Outcome, stall: float) -> None:
    """Open a long stream, read nothing for ``stall`` seconds (its whole generation piles up
    in the API and the socket), then read one line per 5 ms."""
    out.started = time.monotonic()
    try:
        req = client.build_request(
            "POST", "/v1/chat/completions", json=body(out.index, out.max_tokens, True)
        )
        r = await client.send(req, stream=True)
        out.status = r.status_code
        await asyncio.sleep(stall)
        async for line in r.aiter_lines():
            await asyncio.sleep(0.005)
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                out.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                out.error = event["error"]
                continue
            out.id = event["id"]
            out.ids.add(event["id"])
            out.created.add(event["created"])
            for choice in event["choices"]:
                out.content += choice["delta"].get("content") or ""
        await r.aclose()
    except Exception as exc:
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.finished = time.monotonic()


async def slow_reader(stack: Stack, *, n: int, size: str, seed: int = 4) -> Summary:
    """``n`` fast clients (40 tokens each) run twice: alone, then beside n // 10 slow readers
    of 2000-token streams that stall 3 s before reading. The slow streams must arrive
    whole; the fast clients' median latency may not grow by more than half."""
    rng = random.Random(seed)
    s = Summary("slow_reader", size)
    started = time.monotonic()
    stack.api()
    stack.fake_worker("--fake-token-delay", "0.002", "--limit-worker-concurrency", "16")
    base = [Outcome(i, stream=rng.random() < 0.7, max_tokens=40) for i in range(n)]
    fast = [Outcome(n + i, stream=rng.random() < 0.7, max_tokens=40) for i in range(n)]
    slow = [Outcome(2 * n + i, stream=True, max_tokens=2000) for i in range(max(2, n // 10))]
    async with http_client(stack, timeout=120) as client:
        await bounded([request(client, o) for o in base], concurrency=8)
        slow_tasks = [asyncio.create_task(_slow_read(client, o, 3.0)) for o in slow]
        await asyncio.sleep(0.5)
        await bounded([request(client, o) for o in fast], concurrency=8)
        await asyncio.gather(*slow_tasks)
    await finish(stack, base + fast + slow, s, started)
    s.faults = len(slow)
    alone = statistics.median(o.latency for o in base)
    beside = statistics.median(o.latency for o in fast)
    s.notes.update(median_alone_ms=round(alone * 1000), median_beside_slow_ms=round(beside * 1000))
    s.notes["slow_intact"] = sum(o.done and not o.error for o in slow)
    if beside > 1.5 * alone + 0.05:
        s.slow.append(f"fast clients slowed: median {alone:.3f}s -> {beside:.3f}s")
    return s


# ---------------------------------------------------------------------------------------------
# 11. Hang-ups at random points under load (the CVE-2023-28858 class)


async def hangup_churn(stack: Stack, *, n: int, size: str, seed: int = 11) -> Summary:
    """48 clients at once; half hang up at a random point (before the answer, or after a
    random number of tokens), each cancelling in-flight Redis reads inside the API. Every
    completed answer must be exactly its own request's text: a connection left holding
    another command's reply would hand one request another's chunks."""
    rng = random.Random(seed)
    s = Summary("hangup_churn", size)
    started = time.monotonic()
    stack.api("--max-queue", str(n))
    for _ in range(2):
        stack.fake_worker("--fake-token-delay", "0.002", "--limit-worker-concurrency", "16")
    outcomes = [
        Outcome(i, stream=rng.random() < 0.7, max_tokens=rng.randint(5, 60)) for i in range(n)
    ]
    coros = []
    async with http_client(stack, timeout=60) as client:
        for o in outcomes:
            kind = rng.random()
            if kind < 0.25:
                coros.append(request(client, o, give_up_after=rng.uniform(0.001, 0.3)))
            elif kind < 0.5 and o.stream:
                coros.append(request(client, o, hang_up_after=rng.randint(1, o.max_tokens)))
            else:
                coros.append(request(client, o))
        await bounded(coros, concurrency=48)
    await finish(stack, outcomes, s, started)
    s.faults = s.cancelled
    return s
