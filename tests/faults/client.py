"""The fault driver's client side: one request as a client sees it, and load helpers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import httpx
import redis.asyncio as aioredis

from ..stack import Stack
from .ledger import MODEL, Outcome, Summary, check_logs, check_redis, settle


def body(index: int, max_tokens: int, stream: bool, marker: str = "") -> dict:
    prompt = f"req-{index}{marker}"
    if stream:
        return {
            "model": MODEL,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}


def _path(stream: bool) -> str:
    return "/v1/chat/completions" if stream else "/v1/completions"


async def _read_stream(r: httpx.Response, out: Outcome, hang_up_after: int | None) -> None:
    """Read SSE events into ``out``; stop after ``hang_up_after`` content events if given."""
    seen = 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if out.done:
            out.after_done += 1
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            out.done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            if out.error is not None:
                out.after_done += 1  # two error events
            out.error = event["error"]
            continue
        if out.error is not None:
            out.after_done += 1  # content after an error event
        out.id = event["id"]
        out.ids.add(event["id"])
        out.created.add(event["created"])
        for choice in event["choices"]:
            if text := choice["delta"].get("content"):
                out.content += text
                seen += 1
        if hang_up_after is not None and seen >= hang_up_after:
            return


async def request(
    client: httpx.AsyncClient,
    out: Outcome,
    *,
    hang_up_after: int | None = None,
    give_up_after: float | None = None,
    on_hang_up: asyncio.Queue | None = None,
) -> None:
    """One client. ``give_up_after``: hang up if no response headers came by then (a client
    leaving while its job is queued); ``hang_up_after``: hang up after that many tokens."""
    out.started = time.monotonic()
    try:
        req = client.build_request(
            "POST", _path(out.stream), json=body(out.index, out.max_tokens, out.stream, out.marker)
        )
        sending = asyncio.ensure_future(client.send(req, stream=True))
        if give_up_after is not None:
            done, _ = await asyncio.wait({sending}, timeout=give_up_after)
            if not done:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
                out.cancelled = True
                out.finished = time.monotonic()
                if on_hang_up is not None:
                    on_hang_up.put_nowait((out, out.finished))
                return
        r = await sending
        try:
            out.status = r.status_code
            out.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                out.error = json.loads(await r.aread()).get("error")
            elif not out.stream:
                data = json.loads(await r.aread())
                out.id = data["id"]
                out.ids.add(data["id"])
                out.content = data["choices"][0]["text"]
            else:
                await _read_stream(r, out, hang_up_after)
                if hang_up_after is not None and not out.done and out.error is None:
                    out.cancelled = True
        finally:
            await r.aclose()
        out.finished = time.monotonic()
        if out.cancelled and on_hang_up is not None:
            on_hang_up.put_nowait((out, out.finished))
    except Exception as exc:  # a transport error: the ledger counts it as lost
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.finished = out.finished or time.monotonic()


def redis_client(stack: Stack) -> aioredis.Redis:
    return aioredis.Redis.from_url(stack.redis_url, decode_responses=True)


def http_client(stack: Stack, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.url,
        timeout=timeout,
        limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200),
    )


async def loop_lag(s: Summary, tick: float = 0.01) -> None:
    """Record this driver's worst event-loop stall: client-side latencies include it."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(tick)
        s.driver_max_lag_s = max(s.driver_max_lag_s, time.monotonic() - before - tick)


async def bounded(tasks: list, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def run(coro) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(run(c) for c in tasks))


async def finish(stack: Stack, outcomes: list[Outcome], s: Summary, started: float) -> Summary:
    """Balance the books: the clients' view, then Redis (drained, TTLs, chunk logs)."""
    settle(outcomes, s)
    # "200 worker_lost": an error event inside a stream; "503 ...": an error answer
    codes = Counter(f"{o.status} {o.error.get('code')}" for o in outcomes if o.error)
    if codes:
        s.notes["errors"] = dict(codes)
    r = redis_client(stack)
    try:
        await check_redis(r, stack.prefix, s)
        await check_logs(r, stack.prefix, outcomes, s)
    finally:
        await r.aclose()
    s.elapsed_s = time.monotonic() - started
    return s
