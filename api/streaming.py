"""Streaming and non-streaming responses; streaming, resuming and cancellation live here.

A stream's HTTP status is decided by its first chunk: the route waits for it, so a job the
worker rejects (prompt too long, say) still gets a 400, not a 200 with an error inside.
After that, a failure ends the stream with an error event and ``[DONE]``. If the client
goes away before the stream starts, leaving ``service.generate`` sets the job's cancel key
(in a shielded scope), which the worker checks between steps. Once the stream has started,
each event carries an ``id:`` (``SEQ.K``: the K-th event that chunk SEQ of the chunk log
renders to), and a client that goes away leaves the job running for ``--resume-grace``
seconds (api/resume.py): ``GET /v1/chat/completions/{id}/stream`` with ``Last-Event-ID``
renders the log again and sends what follows that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from tokenrelay.queueing.messages import Chunk, Job

from .deps import check_key
from .draining import Drain, shutting_down, until_drained
from .errors import APIError
from .metrics import count_error
from .openai_format import Formatter
from .resume import LOG_TTL, Resumes, not_found, owner_of
from .service import GenerationService, Run, error_from, redis_down

DISCONNECT_POLL = 0.25  # seconds between checks for a client gone before its answer
RESUME_POLL = 0.25  # a resumed stream reads the log after this long without a chunk
RESUME_WAIT = 5.0  # seconds a resume past the job's deadline waits for the log's end
EVENT_ID = re.compile(r"(\d{1,9})\.(\d{1,6})")
COMPLETION_ID = {
    "chat": re.compile(r"chatcmpl-[0-9a-f]{32}"),
    "completion": re.compile(r"cmpl-[0-9a-f]{32}"),
}

Leave = Callable[[], Awaitable[None]]


async def respond(
    service: GenerationService, job: Job, include_usage: bool, request: Request
) -> Any:
    """Answer ``job``; a client that leaves before the answer starts cancels it."""
    drain: Drain = request.app.state.drain
    if job.stream:
        owner = owner_of(check_key(request))
        fmt = Formatter(job, include_usage)
        work = _stream(service, job, fmt, drain, request.app.state.resumes, owner)
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
    service: GenerationService,
    job: Job,
    fmt: Formatter,
    drain: Drain,
    resumes: Resumes,
    owner: str,
) -> EventSourceResponse:
    stack = contextlib.AsyncExitStack()
    try:
        run = await stack.enter_async_context(service.generate(job))
        chunks = run.chunks()
        first = await anext(chunks)
        if first.error:
            raise error_from(first.error)
        leave = await _resumable(resumes, run, fmt.include_usage, owner)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
        raise
    return _response(_events(stack, fmt, first, chunks, drain, leave=leave), drain)


async def _resumable(resumes: Resumes, run: Run, include_usage: bool, owner: str) -> Leave | None:
    """Write the stream's resume record; returns what a client's leaving then does (None:
    the stream is not resumable and leaving cancels the job, as before resumes)."""
    if not resumes.enabled:
        return None
    try:
        await resumes.open(run.job, include_usage, owner)
    except RedisError:
        return None  # the stream goes on, without a resume

    async def leave() -> None:
        run.detach()  # the job keeps running for the grace: leaving must not cancel it
        await resumes.leave(run.job)

    return leave


def _response(events: AsyncIterator[dict[str, str]], drain: Drain) -> EventSourceResponse:
    # sse-starlette cuts open streams when the server starts to stop, unless given a grace:
    # this one outlasts the drain's, so a stream always ends itself with a terminal event.
    return EventSourceResponse(events, sep="\n", ping=15, shutdown_grace_period=drain.grace + 1)


async def _events(
    stack: contextlib.AsyncExitStack,
    fmt: Formatter,
    first: Chunk,
    rest: AsyncIterator[Chunk],
    drain: Drain,
    *,
    leave: Leave | None = None,
    after: tuple[int, int] = (-1, -1),
) -> AsyncIterator[dict[str, str]]:
    """The stream's events from ``first`` on, each with its id; those up to ``after``
    (a resume's Last-Event-ID) are rendered but not sent. A stream that ends before its
    last chunk (the client went away, the server is stopping) calls ``leave`` if given."""
    done = first.done
    try:
        for event in _numbered(fmt, first, opening=True):
            if _position(event) > after:
                yield event
        if not done:
            async for chunk in until_drained(rest, drain):
                if chunk is None:
                    yield _data(shutting_down().body())
                    break
                done = chunk.done
                for event in _numbered(fmt, chunk):
                    if _position(event) > after:
                        yield event
        yield {"data": "[DONE]"}
    finally:
        with anyio.CancelScope(shield=True):
            if not done and leave is not None:
                await leave()
            await stack.aclose()


def _numbered(fmt: Formatter, chunk: Chunk, *, opening: bool = False) -> list[dict[str, str]]:
    """The events ``chunk`` renders to, with ids ``SEQ.K``; the stream's role openings
    count as its first chunk's."""
    bodies = (fmt.opening() if opening else []) + _render(fmt, chunk)
    return [{"id": f"{chunk.seq}.{k}", **_data(body)} for k, body in enumerate(bodies)]


def _position(event: dict[str, str]) -> tuple[int, int]:
    seq, _, k = event["id"].partition(".")
    return int(seq), int(k)


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


def last_event(header: str | None) -> tuple[int, int]:
    """A Last-Event-ID header as a position (none: from the start); else a 400."""
    if header is None or not header.strip():
        return (-1, -1)
    match = EVENT_ID.fullmatch(header.strip())
    if match is None:
        raise APIError(
            400,
            f"Last-Event-ID '{header[:40]}' is not an event id of a tokenrelay stream "
            "(SEQ.K, as the id: lines of the stream read).",
            code="invalid_value",
            param="Last-Event-ID",
        )
    return int(match[1]), int(match[2])


async def resume(
    service: GenerationService, request: Request, kind: str, completion_id: str
) -> EventSourceResponse:
    """The rest of stream ``completion_id`` after its Last-Event-ID, from the chunk log,
    then live until its end; the job is not run again."""
    after = last_event(request.headers.get("last-event-id"))
    resumes: Resumes = request.app.state.resumes
    if not COMPLETION_ID[kind].fullmatch(completion_id):
        raise not_found(completion_id, "no stream of this endpoint has that id.")
    try:
        record = await resumes.find(completion_id)
        state = await resumes.state(record.job) if record else None
    except RedisError as exc:
        raise redis_down(exc) from exc
    if record is None or record.job.kind != kind or not _owns(request, record.owner):
        raise not_found(
            completion_id,
            "unknown id, or its chunk log expired (a stream can be resumed up to "
            f"{LOG_TTL // 60} minutes after its last chunk).",
        )
    if state is None or not state.exists:
        raise not_found(completion_id, "its chunk log expired.", code="stream_expired")
    if state.cancelled and not state.done:
        raise not_found(
            completion_id,
            f"it was cancelled: nobody resumed it within {resumes.grace:g}s of its "
            "client leaving (the API's --resume-grace).",
            code="stream_cancelled",
        )
    return await _follow(service, request, resumes, record.job, record.include_usage, after)


async def _follow(
    service: GenerationService,
    request: Request,
    resumes: Resumes,
    job: Job,
    include_usage: bool,
    after: tuple[int, int],
) -> EventSourceResponse:
    drain: Drain = request.app.state.drain
    try:
        await resumes.join(job)
    except RedisError as exc:
        raise redis_down(exc) from exc
    stack = contextlib.AsyncExitStack()
    try:
        sub = await stack.enter_async_context(service.relay.subscribe(job.model, job.id))
        # every chunk of the newest attempt comes from the log (a gap from chunk 0 on)
        deadline = max(job.deadline, time.time() + RESUME_WAIT)
        chunks = sub.chunks(deadline, poll_interval=RESUME_POLL)
        first = await anext(chunks)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await stack.aclose()
            await resumes.leave(job)
        if isinstance(exc, RedisError | TimeoutError):
            raise redis_down(exc) from exc
        raise

    async def leave() -> None:
        await resumes.leave(job)

    fmt = Formatter(job, include_usage)
    events = _events(stack, fmt, first, chunks, drain, leave=leave, after=after)
    return _response(events, drain)


def _owns(request: Request, owner: str) -> bool:
    """Whether the caller's key is the one that started the stream (any caller when the
    API has no keys: the id, 128 random bits, is then the only secret)."""
    if not request.app.state.settings.api_keys:
        return True
    return hmac.compare_digest(owner_of(check_key(request)), owner)
