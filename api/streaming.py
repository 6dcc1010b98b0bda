"""Streaming and non-streaming responses; streaming and cancellation live here.

A stream's HTTP status is decided by its first chunk: the route waits for it, so a job the
worker rejects (prompt too long, say) still gets a 400, not a 200 with an error inside.
After that, a failure ends the stream with an error event and ``[DONE]``. If the client
goes away, sse-starlette cancels the generator and leaving ``service.generate`` sets the
job's cancel key (in a shielded scope), which the worker checks between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from tokenrelay.queueing.messages import Chunk, Job

from .draining import Drain, shutting_down, until_drained
from .errors import APIError
from .metrics import count_error
from .openai_format import Formatter
from .service import GenerationService, error_from

DISCONNECT_POLL = 0.25  # seconds between checks for a client gone before its answer


async def respond(
    service: GenerationService, job: Job, include_usage: bool, request: Request
) -> Any:
    """Answer ``job``; a client that leaves before the answer starts cancels it."""
    drain: Drain = request.app.state.drain
    if job.stream:
        work = _stream(service, job, Formatter(job, include_usage), drain)
    else:
        work = _whole(service, job)
    return await _unless_disconnected(request, work, drain)


async def _unless_disconnected(
    request: Request, work: Coroutine[Any, Any, Any], drain: Drain
) -> Any:
    """Run ``work`` while watching the client; if it goes away, or the server's shutdown
    grace runs out, cancel ``work`` (whose cleanup cancels the job, even one still queued)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
        if done:
            return task.result()
        gone = await request.is_disconnected()
        if gone or drain.expired():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not gone:
                raise shutting_down()
            count_error(request, "client_disconnected")
            return Response(status_code=499)


async def _whole(service: GenerationService, job: Job) -> JSONResponse:
    async with service.generate(job) as run:
        return JSONResponse(await run.whole())


async def _stream(
    service: GenerationService, job: Job, fmt: Formatter, drain: Drain
) -> EventSourceResponse:
    stack = contextlib.AsyncExitStack()
    try:
        run = await stack.enter_async_context(service.generate(job))
        chunks = run.chunks()
        first = await anext(chunks)
        if first.error:
            raise error_from(first.error)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    # sse-starlette cuts open streams when the server starts to stop, unless given a grace:
    # this one outlasts the drain's, so a stream always ends itself with a terminal event.
    return EventSourceResponse(
        _events(stack, fmt, first, chunks, drain),
        sep="\n",
        ping=15,
        shutdown_grace_period=drain.grace + 1,
    )


async def _events(
    stack: contextlib.AsyncExitStack,
    fmt: Formatter,
    first: Chunk,
    rest: AsyncIterator[Chunk],
    drain: Drain,
) -> AsyncIterator[dict[str, str]]:
    try:
        for body in fmt.opening():
            yield _data(body)
        for body in _render(fmt, first):
            yield _data(body)
        if not first.done:
            async for chunk in until_drained(rest, drain):
                if chunk is None:
                    yield _data(shutting_down().body())
                    break
                for body in _render(fmt, chunk):
                    yield _data(body)
        yield {"data": "[DONE]"}
    finally:
        with anyio.CancelScope(shield=True):
            await stack.aclose()


def _render(fmt: Formatter, chunk: Chunk) -> list[dict[str, Any]]:
    if chunk.error:
        return [
            APIError(
                chunk.error.status,
                chunk.error.message,
                type=chunk.error.type,
                code=chunk.error.code,
            ).body()
        ]
    out = fmt.deltas(chunk.choices)
    if chunk.done and chunk.usage and fmt.include_usage:
        out.append(fmt.usage(chunk.usage))
    return out


def _data(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, separators=(",", ":"))}
