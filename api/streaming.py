"""Streaming and non-streaming responses; streaming and cancellation live here.

A stream's HTTP status is decided by its first chunk: the route waits for it, so a job the
worker rejects (prompt too long, say) still gets a 400, not a 200 with an error inside.
After that, a failure ends the stream with an error event and ``[DONE]``. If the client
goes away, sse-starlette cancels the generator and leaving ``service.generate`` sets the
job's cancel key (in a shielded scope), which the worker checks between steps.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from tokenrelay.queueing.messages import Chunk, Job

from .errors import APIError
from .openai_format import Collector, Formatter
from .service import GenerationService, error_from


async def respond(service: GenerationService, job: Job, include_usage: bool) -> Any:
    if job.stream:
        return await _stream(service, job, Formatter(job, include_usage))
    return await _whole(service, job)


async def _whole(service: GenerationService, job: Job) -> JSONResponse:
    collector = Collector(job.params.n)
    async with service.generate(job) as run:
        async for chunk in run.chunks():
            if chunk.error:
                raise error_from(chunk.error)
            collector.add(chunk)
    body = Formatter(job).whole(collector.texts, collector.finish, collector.usage)
    return JSONResponse(body)


async def _stream(service: GenerationService, job: Job, fmt: Formatter) -> EventSourceResponse:
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
    return EventSourceResponse(_events(stack, fmt, first, chunks), sep="\n", ping=15)


async def _events(
    stack: contextlib.AsyncExitStack, fmt: Formatter, first: Chunk, rest: AsyncIterator[Chunk]
) -> AsyncIterator[dict[str, str]]:
    try:
        for body in fmt.opening():
            yield _data(body)
        for body in _render(fmt, first):
            yield _data(body)
        if not first.done:
            async for chunk in rest:
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
