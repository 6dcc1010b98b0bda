"""The worker loop: pull jobs from the model's consumer group, run them, relay chunks.

A job is acknowledged (and deleted from the stream) only after its last chunk is out, so a
worker that dies mid-job leaves it pending; a live worker reclaims it once the dead one's
heartbeat key has expired, and continues a stream after the tokens it had sent
(continuation.py). Every write for a job is fenced on still owning its delivery
(queueing/fencing.py; ownership.py lets go of the jobs a resumed worker lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay import __version__
from tokenrelay.logs import bind_request_id
from tokenrelay.queueing.chunks import ChunkOutbox, ChunkPublisher
from tokenrelay.queueing.cluster import UNAVAILABLE
from tokenrelay.queueing.consumer import Delivery, JobConsumer
from tokenrelay.queueing.fencing import LostDelivery
from tokenrelay.queueing.keys import Keys, Lane
from tokenrelay.queueing.messages import ChoiceDelta, ErrorInfo, Job, Result, Usage
from tokenrelay.queueing.registry import Registry, WorkerInfo

from .continuation import ContinuedJob, resume
from .embed_job import run_embed
from .engine import Engine, EngineEvent, InvalidRequest
from .lanes import LaneReader
from .ownership import Ownership
from .refusals import refuse_unknown_needs, refuse_unreadable
from .sampling import with_defaults
from .throughput import Throughput

log = logging.getLogger(__name__)

STOP_WRITES_S = 3.0  # the most a stopping worker waits on Redis to deregister


class _RunAgain(Exception):
    """The engine failed on a job that may succeed on another delivery: leave it pending."""


@dataclass
class WorkerOptions:
    models: list[str]
    device: str = "cpu"
    concurrency: int = 8
    heartbeat_interval: float = 1.0
    heartbeat_ttl: float = 4.0
    max_deliveries: int = 3
    chunk_ttl: int = 600
    shutdown_grace: float = 30.0
    chunk_interval: float = 0.05  # seconds between a busy worker's chunk rounds
    worker_id: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:12]}")


class Worker:
    def __init__(self, redis: aioredis.Redis, keys: Keys, engine: Engine, options: WorkerOptions):
        self.redis = redis
        self.keys = keys
        self.engine = engine
        self.options = options
        self.consumer = JobConsumer(redis, keys, options.worker_id)
        self.reader = LaneReader(self.consumer, options.models, options.concurrency)
        self.registry = Registry(redis, keys)
        self.ownership = Ownership(redis, self.consumer)
        # keyed by Delivery.key: (lane, stream entry id)
        self.inflight: dict[tuple[Lane, str], asyncio.Task[None]] = {}
        self.deliveries: dict[tuple[Lane, str], Delivery] = {}
        self.jobs: dict[tuple[Lane, str], Job] = {}
        self._noticed: set[str] = set()  # job ids whose cancel the cancel loop has logged
        self.outbox = ChunkOutbox(redis, interval=options.chunk_interval)
        self._slot_free = asyncio.Event()
        self._stopping = asyncio.Event()
        self._reread_at = 0.0  # when to re-read our own pending jobs (0: no need)
        self.throughput = Throughput()
        self.info = WorkerInfo(
            id=options.worker_id,
            models=options.models,
            device=options.device,
            capacity=options.concurrency,
            version=__version__,
            host=socket.gethostname(),
            pid=os.getpid(),
            max_context=engine.max_context,
            engine=engine.name,
            weights=engine.weights,
        )

    async def run(self) -> None:
        """Serve until :meth:`stop`; then finish in-flight jobs within the grace period."""
        await self.consumer.ensure_groups(self.options.models)
        await self._heartbeat_once()
        self.outbox.start()
        log.info(
            "worker %s serving %s on %s (%d concurrent)",
            self.options.worker_id,
            ",".join(self.options.models),
            self.options.device,
            self.options.concurrency,
        )
        background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._cancel_loop(), name="cancel-watch"),
        ]
        try:
            await self._read_loop()
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            await self.outbox.close()
            # Bounded: a stopping worker exits within its grace and a few seconds. Should
            # Redis not answer (or the pool have no free connection), its keys lapse with
            # their TTL instead, as a dead worker's do.
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(STOP_WRITES_S):
                    await self.registry.deregister(self.info)

    def stop(self) -> None:
        self._stopping.set()
        self._slot_free.set()

    async def _drain(self) -> None:
        if not self.inflight:
            return
        log.info(
            "waiting up to %.0fs for %d in-flight jobs",
            self.options.shutdown_grace,
            len(self.inflight),
        )
        _, pending = await asyncio.wait(
            list(self.inflight.values()), timeout=self.options.shutdown_grace
        )
        if not pending:  # everything finished within the grace
            return
        late = [self.deliveries[k] for k, task in self.inflight.items() if task in pending]
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=5)
        await self._hand_back(late)  # the rest go back at once, for others to run

    async def _hand_back(self, deliveries: list[Delivery]) -> None:
        try:
            given = await self.consumer.hand_back(deliveries)
            log.info("handed back %d jobs", given)
        except (RedisError, OSError) as exc:  # they wait for our heartbeat to lapse instead
            log.warning("could not hand back %d jobs: %s", len(deliveries), exc)

    # reading jobs

    async def _read_loop(self) -> None:
        own_pending = True  # on start and after a connection error, re-read our own first
        next_reclaim = 0.0
        while not self._stopping.is_set():
            free = self.options.concurrency - len(self.inflight)
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            # A dead worker's jobs go before new ones: checked here, when a slot is free,
            # they would otherwise wait until the queue is empty (and past their deadline
            # under steady load).
            if not own_pending and time.monotonic() >= next_reclaim:
                next_reclaim = time.monotonic() + self.options.heartbeat_interval
                claimed = await self.reader.reclaim(free)
                for delivery in claimed:
                    self._start(delivery)  # logged by the job's task, under its request id
                if claimed:
                    continue
            if self._reread_at and time.monotonic() >= self._reread_at:
                self._reread_at = 0.0  # a job failed on Redis: it is pending, run it again
                own_pending = True
            try:
                if own_pending:
                    deliveries, done = await self.reader.read_own_pending(free, self._running())
                    own_pending = not done
                else:
                    deliveries = await self.reader.read(free)
            except (RedisConnectionError, RedisTimeoutError, OSError, *UNAVAILABLE) as exc:
                log.warning("redis unreachable while reading jobs (%s); retrying", exc)
                own_pending = True
                await asyncio.sleep(1.0)
                continue
            except ResponseError as exc:
                if not str(exc).startswith("UNBLOCKED"):
                    raise
                # A blocked XREADGROUP whose stream moved to another shard (a Redis Cluster
                # reshard migrated its slot): read again, there. This crashed the worker.
                log.warning("job stream moved while reading (%s); reading again", exc)
                own_pending = True
                continue
            if self._stopping.is_set():  # read while stopping: not ours to run any more
                await self._hand_back(deliveries)
                break
            for delivery in deliveries:
                self._start(delivery)

    def _running(self) -> dict[Lane, list[str]]:
        running: dict[Lane, list[str]] = {}
        for lane, entry_id in self.inflight:
            running.setdefault(lane, []).append(entry_id)
        return running

    def _start(self, delivery: Delivery) -> None:
        key = delivery.key
        if key in self.inflight or self._stopping.is_set():
            return
        task = asyncio.create_task(self._run_job(delivery), name=f"job-{delivery.entry_id}")
        self.inflight[key] = task
        self.deliveries[key] = delivery
        task.add_done_callback(lambda _: self._finished(key))

    def _finished(self, key: tuple[Lane, str]) -> None:
        self.inflight.pop(key, None)
        self.deliveries.pop(key, None)
        self.jobs.pop(key, None)
        self._slot_free.set()

    # running one job

    async def _run_job(self, delivery: Delivery) -> None:
        try:
            job = Job.model_validate_json(delivery.payload)
        except ValidationError as exc:
            await refuse_unreadable(self.redis, self.keys, self.consumer, delivery, exc)
            return
        if job.unknown_needs():
            await refuse_unknown_needs(self.redis, self.keys, self.consumer, job, delivery)
            return
        job.params = with_defaults(job.params, self.engine.sampling_defaults)
        self.jobs[delivery.key] = job
        bind_request_id(job.request_id or job.id)  # this job's task: its log records
        if delivery.reclaimed:
            log.warning("reclaimed job %s from a dead worker", delivery.entry_id)
        publisher = ChunkPublisher(
            self.redis,
            self.keys,
            job.model,
            job.id,
            attempt=delivery.attempt,
            ttl=self.options.chunk_ttl,
            outbox=self.outbox,
            fence=self.consumer.fence(delivery),
        )
        try:
            run = await self._prepare(job, delivery, publisher)
            if run is not None and run.kind == "embed":
                await run_embed(self.engine, run, delivery, publisher, self._engine_failed)
            elif run is not None:
                await self._generate(run, delivery, publisher)
            await self.consumer.finish(delivery)
        except asyncio.CancelledError:
            self.engine.cancel(job.id)
            raise
        except LostDelivery as exc:  # another worker owns it now: nothing we wrote landed
            self.engine.cancel(job.id)
            self.ownership.drop(exc)
        except _RunAgain:
            self._reread_at = self._reread_at or time.monotonic() + 1.0
        except RedisError as exc:
            # Left unacked: this worker re-reads it a little later (as a re-delivery, with a
            # higher attempt), or another reclaims it.
            log.error("redis failed during job %s (%s); it stays pending", job.id, exc)
            self.engine.cancel(job.id)
            self._reread_at = self._reread_at or time.monotonic() + 1.0

    async def _prepare(self, job: Job, delivery: Delivery, publisher: ChunkPublisher) -> Job | None:
        """The job to run: itself, or a stream continued after the tokens an earlier
        delivery sent; None to acknowledge it unrun."""
        (cancelled,) = await self.consumer.is_cancelled(job.model, [job.id])
        if cancelled:
            log.info("job %s was cancelled before it started", job.id)
            return None
        if time.time() > job.deadline:
            await publisher.send(
                error=ErrorInfo(
                    message="The request waited in the queue past its deadline.",
                    type="timeout",
                    code="queue_timeout",
                    status=503,
                )
            )
            return None
        if delivery.attempt > self.options.max_deliveries:
            log.error("job %s failed %d deliveries; dead-lettering", job.id, delivery.attempt - 1)
            await publisher.send(  # the client first: once dead, the job is not ours
                error=ErrorInfo(
                    message=f"The request failed on {delivery.attempt - 1} workers in a row and "
                    "was set aside (dead-letter stream).",
                    type="server_error",
                    code="dead_lettered",
                    status=500,
                )
            )
            await self.consumer.dead_letter(delivery, "too many deliveries")
            return None
        if delivery.attempt > 1:
            log.info("job %s re-delivered (attempt %d)", job.id, delivery.attempt)
            return await resume(self.redis, self.keys, job, publisher, self.options.chunk_ttl)
        return job

    async def _generate(self, job: Job, delivery: Delivery, publisher: ChunkPublisher) -> None:
        n = job.params.n
        texts = [job.continued_text if isinstance(job, ContinuedJob) else ""] + [""] * (n - 1)
        finish: list[str | None] = [None] * n
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        started = time.monotonic()
        handle = self.engine.submit(job, background=delivery.lane == "batch")
        counted = 0  # this job's tokens already in self.throughput
        try:
            async for events in handle.stream():
                deltas = _merge(events, texts, finish)
                usage = _usage(events[-1])
                counted = self.throughput.count(usage.completion_tokens, counted)
                if isinstance(job, ContinuedJob):
                    usage = job.usage(usage)
                if time.time() > job.deadline:
                    self.engine.cancel(job.id)
                    await publisher.send(error=ErrorInfo.deadline_exceeded())
                    return
                if await publisher.send(deltas, tokens=usage):
                    log.info("job %s cancelled by its client", job.id)
                    self.engine.cancel(job.id)
                    await publisher.send(error=_cancelled())  # ends every follower's stream
                    return
        except InvalidRequest as exc:
            await publisher.send(error=exc.error())
            return
        except (RedisError, LostDelivery):
            raise  # not the model's fault: the job stays pending and runs again
        except Exception as exc:
            log.exception("engine failed on job %s (attempt %d)", job.id, delivery.attempt)
            await self._engine_failed(delivery, publisher, exc)
            return
        if None in finish:  # the engine ended the job early: cancelled
            await publisher.send(error=_cancelled())
            return
        choices = [
            ChoiceDelta(index=i, text=t, finish_reason=finish[i]) for i, t in enumerate(texts)
        ]
        await publisher.send(usage=usage, result=Result(id=job.id, choices=choices, usage=usage))
        log.info(
            "job %s done: %d prompt + %d completion tokens in %.2fs",
            job.id,
            usage.prompt_tokens,
            usage.completion_tokens,
            time.monotonic() - started,
        )

    async def _engine_failed(
        self, delivery: Delivery, publisher: ChunkPublisher, exc: Exception
    ) -> None:
        """A job the engine failed on runs again until its deliveries run out, then goes to
        the dead-letter stream with an error to its client. A stream that has sent tokens
        cannot run again unseen: it gets the error at once."""
        if delivery.attempt < self.options.max_deliveries and not publisher.sent:
            raise _RunAgain from exc
        await publisher.send(
            error=ErrorInfo(
                message=f"The model failed on this request ({delivery.attempt} deliveries; "
                f"set aside in the dead-letter stream): {exc}",
                type="server_error",
                code="engine_error",
                status=500,
            )
        )
        await self.consumer.dead_letter(delivery, f"engine error: {exc}")

    # background duties

    async def _heartbeat_once(self) -> None:
        self.info.inflight = len(self.inflight)
        self.info.tokens_per_s = self.throughput.rate()
        self.info.tokens_total = self.throughput.total
        await self.registry.heartbeat(self.info, self.options.heartbeat_ttl)

    async def _heartbeat_loop(self) -> None:
        beat = self.ownership.beat(self.options.heartbeat_ttl)
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            try:
                await self._heartbeat_once()
                # within one heartbeat of coming back, let go of jobs others took meanwhile
                await self.ownership.check(self.deliveries, self.inflight)
            except (RedisError, OSError) as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            beat()

    async def _cancel_loop(self) -> None:
        """Notice cancellations of jobs that emit nothing for a while (long prefill, say)."""
        while True:
            await asyncio.sleep(0.25)
            jobs = list(self.jobs.values())
            for model in self.options.models:
                mine = [j for j in jobs if j.model == model]
                try:
                    flags = await self.consumer.is_cancelled(model, [j.id for j in mine])
                except (RedisError, OSError):
                    continue
                for job, cancelled in zip(mine, flags, strict=True):
                    if cancelled and job.id not in self._noticed:
                        # the same word as when a chunk round notices it first
                        log.info("job %s cancelled by its client", job.id)
                        self._noticed.add(job.id)
                        self.engine.cancel(job.id)
            self._noticed &= {j.id for j in self.jobs.values()}


def _merge(
    events: list[EngineEvent], texts: list[str], finish: list[str | None]
) -> list[ChoiceDelta]:
    """Fold a batch of engine events into one delta per choice, and into the totals."""
    merged: dict[int, ChoiceDelta] = {}
    for event in events:
        for d in event.deltas:
            texts[d.index] += d.text
            if d.finish_reason:
                finish[d.index] = d.finish_reason
            cur = merged.setdefault(d.index, ChoiceDelta(index=d.index))
            cur.text += d.text
            cur.finish_reason = d.finish_reason or cur.finish_reason
            for name in ("prompt_logprobs", "logprobs"):  # workers/logprobs.py: if asked
                if getattr(d, name) is not None:
                    setattr(cur, name, (getattr(cur, name) or []) + getattr(d, name))
    return [merged[i] for i in sorted(merged)]


def _usage(event: EngineEvent) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
    )


def _cancelled() -> ErrorInfo:
    """A cancelled stream's last chunk (its client hung up past the grace, or asked)."""
    return ErrorInfo(
        message="The request was cancelled.", type="cancelled", code="cancelled", status=499
    )
