"""The one service the routes call: check a model, enqueue a job, follow its chunks."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError

from tokenrelay.queueing.durability import Durability, NotReplicated
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import Lane
from tokenrelay.queueing.messages import Chunk, ErrorInfo, Job
from tokenrelay.queueing.registry import Registry, WorkerInfo
from tokenrelay.queueing.relay import ChunkRelay, Subscription
from tokenrelay.queueing.status import Status, snapshot

from .errors import APIError, model_not_found, overloaded, wrong_task
from .metrics import Metrics, RequestTimer
from .openai_format import Collector, Formatter
from .settings import APISettings

log = logging.getLogger(__name__)

# How long a request's model check may reuse the registry as another request read it. Only
# a model found with live workers is reused: a miss is read again at once, so a worker that
# just started serves the next request; one that just died may still be seen for this long,
# as it could be anyway between the check and the enqueue (its jobs are reclaimed).
DISPATCH_CACHE_S = 0.5


def redis_down(exc: Exception) -> APIError:
    if _refused(exc):
        return APIError(
            503,
            f"Redis refused a command to this API's user: {exc}. Give the user the rights "
            "README's Security section lists (Redis: passwords, TLS and least-privilege users).",
            type="server_error",
            code="redis_no_permission",
        )
    return APIError(
        503,
        f"The job queue (Redis) is unreachable: {exc}. Retry shortly.",
        type="server_overloaded",
        code="queue_unavailable",
        retry_after=2,
    )


def not_replicated(exc: Exception) -> APIError:
    return APIError(
        503,
        f"The job queue could not make this request durable: {exc} (a replica lagging or "
        "lost, or a failover under way). It was not accepted; retry shortly.",
        type="server_overloaded",
        code="enqueue_not_replicated",
        retry_after=2,
    )


def _refused(exc: Exception) -> bool:
    """An ACL refusal: NOPERM, or a script calling a command the user may not run (redis-py
    raises that one, and a refused command of a pipeline, as plain ResponseErrors)."""
    text = str(exc)
    return (
        isinstance(exc, NoPermissionError)
        or "no permissions" in text
        or ("can't run this command" in text)
    )


def error_from(info: ErrorInfo) -> APIError:
    retry = 2.0 if info.status in (429, 503) else None
    exc = APIError(
        info.status,
        info.message,
        type=info.type,
        code=info.code,
        param=info.param,
        retry_after=retry,
    )
    exc.counted = True  # by the request's timer, when the chunk arrived
    return exc


@dataclass
class Run:
    """One enqueued job, followed through its chunks until done or the deadline."""

    job: Job
    sub: Subscription
    timer: RequestTimer
    finished: bool = False

    async def chunks(self) -> AsyncIterator[Chunk]:
        async for chunk in self.sub.chunks(self.job.deadline):
            self.finished = chunk.done
            self.timer.chunk(chunk)
            yield chunk

    async def whole(self) -> dict[str, Any]:
        """The answer as one OpenAI completion object; a worker's error raises it."""
        collector = Collector(self.job.params.n)
        async for chunk in self.chunks():
            if chunk.error:
                raise error_from(chunk.error)
            collector.add(chunk)
        return Formatter(self.job).collected(collector)

    def detach(self) -> None:
        """Leave without cancelling the job: someone else follows it (a batch runner that
        resumes the batch)."""
        self.finished = True


class GenerationService:
    def __init__(
        self,
        redis: aioredis.Redis,
        relay: ChunkRelay,
        settings: APISettings,
        metrics: Metrics | None = None,
        queue: JobQueue | None = None,
    ) -> None:
        self.redis = redis
        self.relay = relay
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.queue = queue or JobQueue(
            redis,
            settings.redis.keys,
            durability=Durability(
                redis, settings.durable_enqueue, settings.durable_enqueue_timeout_ms
            ),
        )
        self.registry = Registry(redis, settings.redis.keys)
        self._seen: tuple[float, dict[str, list[WorkerInfo]]] = (-DISPATCH_CACHE_S, {})

    async def dispatch_workers(self, model: str) -> list[WorkerInfo]:
        """The live workers of ``model`` for a request's check: the registry as read by a
        request less than DISPATCH_CACHE_S ago when it had workers of the model, else read
        now. A burst of requests then reads the registry once, not once each."""
        at, models = self._seen
        if time.monotonic() - at < DISPATCH_CACHE_S and models.get(model):
            return models[model]
        models = await self.live_models()
        self._seen = (time.monotonic(), models)
        return models.get(model) or []

    async def live_models(self) -> dict[str, list[WorkerInfo]]:
        try:
            return await self.registry.live_models()
        except RedisError as exc:
            raise redis_down(exc) from exc

    async def status(self) -> Status:
        try:
            return await snapshot(self.redis, self.settings.redis.keys)
        except RedisError as exc:
            raise redis_down(exc) from exc

    async def check(
        self, model: str, max_tokens: int | None, n: int = 1, task: str = "generate"
    ) -> None:
        """404 for a model never served, 503 for one with no live worker, 400 for a
        max_tokens no worker of it can hold, an ``n`` beyond every worker's slots, or a
        model whose workers do another ``task`` (a chat request to an embedding model)."""
        workers = await self.dispatch_workers(model)
        if workers and not any(w.task == task for w in workers):
            raise wrong_task(model, workers[0].task)
        workers = [w for w in workers or [] if w.task == task]
        if not workers:
            try:
                known = await self.registry.is_known(model)
            except RedisError as exc:
                raise redis_down(exc) from exc
            if not known:
                raise model_not_found(model)
            raise overloaded(
                f"No worker is serving '{model}' right now; start one with "
                f"`tokenrelay worker --model-names {model} ...`.",
                status=503,
                retry_after=5,
            )
        context = max(w.max_context for w in workers)
        if max_tokens is not None and context and max_tokens >= context:
            raise APIError(
                400,
                f"max_tokens={max_tokens} is beyond this model's context length "
                f"({context} tokens, prompt included).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # A worker runs a request's n choices side by side, one of its slots each.
        capacity = max(w.capacity for w in workers)
        if n > capacity:
            raise APIError(
                400,
                f"n={n} is more than the workers of '{model}' can run at once: at most "
                f"n={capacity} (a worker's --limit-worker-concurrency).",
                param="n",
                code="n_too_large",
            )

    @contextlib.asynccontextmanager
    async def generate(self, job: Job, lane: Lane = "interactive") -> AsyncIterator[Run]:
        """Subscribe (confirmed), enqueue, and cancel the job if we leave before its end."""
        timer = self.metrics.start(job.model)
        try:
            async with self.relay.subscribe(job.model, job.id) as sub:
                try:
                    result = await self.queue.enqueue(
                        job, max_depth=self.settings.max_queue, lane=lane
                    )
                except NotReplicated as exc:
                    if lane == "interactive":
                        # The primary may have the job: cancel it, so no worker runs an
                        # answer nobody waits for (the client retries as a new request). A
                        # batch line retries with the same id, whose enqueue then waits for
                        # the replica again: its job must stay.
                        with anyio.CancelScope(shield=True):
                            await self.cancel(job)
                    raise not_replicated(exc) from exc
                if result.status == "full":
                    raise overloaded(
                        f"The queue for '{job.model}' is full ({result.detail} "
                        "requests waiting or running). Retry shortly."
                    )
                run = Run(job, sub, timer)
                try:
                    yield run
                finally:
                    if not run.finished:
                        with anyio.CancelScope(shield=True):
                            await self.cancel(job)
        except (RedisError, TimeoutError) as exc:
            raise redis_down(exc) from exc

    async def cancel(self, job: Job) -> None:
        try:
            await self.queue.cancel(job.model, job.id)
        except RedisError as exc:
            log.warning("could not cancel %s: %s", job.id, exc)
