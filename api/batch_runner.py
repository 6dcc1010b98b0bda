"""What runs a batch, in the RQ job of api/batch_job.py: validate its file, feed its lines
to the model queues, collect the answers, write the output and error files.

    BatchRunner.run(id)           (the RQ job, in `tokenrelay batch-worker`)
      lease {b:ID}:lease          one runner at a time; refreshed while it runs
      validating: parse the file  any bad line -> failed, errors name the lines
      in_progress: N feeders      each takes the next line not yet recorded:
        check the model             (GenerationService.check: 404 / 400 -> error line)
        enqueue on the batch lane   job id from batch + line: a resumed run dedupes
        follow its chunks           (Run.whole, as a non-streamed request)
        record the line             HSETNX: kept and counted once
      watcher                     cancelling -> cancel the lines' jobs; window over ->
                                  expired; every feeder done -> finalizing
      finish                      output file (answers), error file (failed lines, and
                                  lines cut off by cancel or expiry), final status

A runner that dies (SIGKILL, a lost machine) leaves its lease to expire; RQ retries the job
(``Retry``) and the new run starts again from the recorded lines: those in flight are queued
again under the same ids, so they dedupe to the jobs already queued and their answers are
read from the chunk log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tokenrelay.queueing.batch_queue import FINALIZE_S
from tokenrelay.queueing.batches import Batch, BatchStore, LineError
from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.durability import Durability
from tokenrelay.queueing.files import FileGone, FileStore
from tokenrelay.queueing.jobs import JobQueue
from tokenrelay.queueing.keys import Lane
from tokenrelay.queueing.messages import Job
from tokenrelay.queueing.relay import ChunkRelay

from .batch_lines import BatchLine, parse
from .embeddings import EmbeddingRequest, answer
from .errors import APIError, prompt_too_long
from .service import GenerationService
from .settings import APISettings

log = logging.getLogger(__name__)

LANE: Lane = "batch"
OUTPUT_EXPIRES_S = 30 * 86400  # output and error files, as OpenAI's batch files
RETRY_S = 1.0  # before trying a line again after a passing error (Redis, a full lane)
PASSING = ("queue_unavailable", "overloaded", "server_shutting_down", "enqueue_not_replicated")
ENDS = {
    "completed": ("finalizing",),
    "cancelled": ("cancelling", "in_progress"),
    "expired": ("in_progress", "cancelling"),
}
CUT_OFF = {
    "cancelled": ("batch_cancelled", "This request was not run: the batch was cancelled."),
    "expired": (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
}


@dataclass
class RunnerSettings:
    redis: RedisSettings
    lines_in_flight: int = 32  # per batch
    lease_ttl: float = 30.0  # seconds a dead runner holds its batch
    poll_interval: float = 0.5  # seconds between checks for cancel and expiry
    max_queue: int = 100_000  # batch-lane jobs of a model before a line waits
    max_prompt_chars: int = 200_000  # as the API's --max-prompt-chars: longer lines fail


class LeaseLost(RuntimeError):
    pass


class BatchRunner:
    def __init__(
        self,
        settings: RunnerSettings,
        redis: aioredis.Redis,
        file_redis: aioredis.Redis,
        relay: ChunkRelay,
    ) -> None:
        self.settings = settings
        self.keys = settings.redis.keys
        self.redis = redis
        self.relay = relay
        self.store = BatchStore(redis, self.keys)
        self.files = FileStore(file_redis, self.keys)
        # Leaving with lines in flight cancels their jobs only when the batch ends early
        # (cancel, expiry); otherwise (a crash, a lost lease) a resumed run follows them.
        self.stop_jobs = False
        self.lease_lost = False

    async def run(self, batch_id: str) -> str:
        token = uuid.uuid4().hex
        batch = await self._acquire(batch_id, token)
        if batch is None or batch.ended:
            return batch.status if batch else "gone"
        keeper = asyncio.create_task(self._keep(batch_id, token, asyncio.current_task()))
        try:
            return await self._run(batch)
        except asyncio.CancelledError:
            if self.lease_lost:
                raise LeaseLost(f"batch {batch_id}: another runner took its lease") from None
            raise
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            with contextlib.suppress(RedisError):
                await self.store.release(batch_id, token)

    async def _acquire(self, batch_id: str, token: str) -> Batch | None:
        """The batch once this runner holds its lease (None, or an ended batch, if there is
        nothing left to do)."""
        ttl_ms = int(self.settings.lease_ttl * 1000)
        waited = False
        while not await self.store.acquire(batch_id, token, ttl_ms):
            batch = await self.store.get(batch_id)
            if batch is None or batch.ended:
                return batch
            if not waited:
                log.info("batch %s: another runner holds it; waiting for its lease", batch_id)
                waited = True
            await asyncio.sleep(min(1.0, self.settings.lease_ttl / 3))
        batch = await self.store.get(batch_id)
        if batch is None:
            log.error("batch %s: no such batch (deleted, or its record expired)", batch_id)
        return batch

    async def _keep(self, batch_id: str, token: str, main: asyncio.Task[Any] | None) -> None:
        ttl_ms = int(self.settings.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)
            try:
                held = await self.store.refresh(batch_id, token, ttl_ms)
            except RedisError as exc:
                log.warning("batch %s: could not refresh its lease: %s", batch_id, exc)
                continue
            if not held:
                log.error(
                    "batch %s: lost its lease (this runner stalled for over %.0f s); "
                    "leaving the batch to the runner that took it",
                    batch_id,
                    self.settings.lease_ttl,
                )
                self.lease_lost = True
                if main is not None:
                    main.cancel()
                return

    async def _run(self, batch: Batch) -> str:
        lines = await self._lines(batch)
        if lines is None:
            return "failed"
        if batch.status == "validating":
            model = lines[0].request.model
            _, batch.status = await self.store.move(
                batch.id, ("validating",), "in_progress", total=len(lines), model=model
            )
            log.info("batch %s: %d lines, in progress", batch.id, len(lines))
        if batch.ended:  # read past its window before this run took it up (api/batches.py)
            return batch.status
        if batch.status == "in_progress":
            outcome = await self._process(batch, lines)
        else:  # resumed while ending
            outcome = "cancelled" if batch.status == "cancelling" else "completed"
        return await self._finish(batch, lines, outcome)

    async def _lines(self, batch: Batch) -> list[BatchLine] | None:
        """The input file's lines; None after failing the batch on a bad file."""
        data = await self._read(batch.input_file_id)
        if data is None:
            message = f"The input file {batch.input_file_id} was deleted or has expired."
            errors = [LineError(code="file_not_found", message=message, param="input_file_id")]
            if batch.status != "validating":  # a resumed run: keep what was answered
                await self._fail_keeping_answers(batch, errors)
                return None
        else:
            lines, errors = parse(data, batch.endpoint)
            if not errors:
                return lines
        moved, _ = await self.store.move(
            batch.id, ("validating", "in_progress", "cancelling"), "failed", errors=errors
        )
        if moved:
            log.warning("batch %s failed validation: %s", batch.id, errors[0].message)
        return None

    async def _fail_keeping_answers(self, batch: Batch, errors: list[LineError]) -> None:
        """The input file went away while the batch ran (deleted, or expired) and a run
        that died is being resumed: the lines answered so far still make the output and
        error files, and the batch fails with the reason (no answer is dropped)."""
        recorded = await self.store.recorded(batch.id)
        answers = [r.text for r in recorded if r.ok]
        failures = [r.text for r in recorded if not r.ok]
        output_id = await self._write(batch, "output", answers)
        error_id = await self._write(batch, "error", failures)
        moved, _ = await self.store.move(
            batch.id,
            ("in_progress", "cancelling"),
            "failed",
            errors=errors,
            output_file_id=output_id,
            error_file_id=error_id,
            completed=len(answers),
            failed=(batch.total or len(recorded)) - len(answers),
        )
        if moved:
            log.warning(
                "batch %s failed: its input file is gone; %d answered lines kept in %s",
                batch.id,
                len(answers),
                output_id,
            )

    async def _read(self, file_id: str) -> bytes | None:
        info = await self.files.get(file_id)
        if info is None:
            return None
        try:
            return b"".join([chunk async for chunk in self.files.content(info)])
        except FileGone:
            return None

    async def _process(self, batch: Batch, lines: list[BatchLine]) -> str:
        if time.time() >= batch.expires_at:  # it waited for a batch worker all its window
            return "expired"
        service = self._service(batch)
        recorded = await self.store.recorded_lines(batch.id)
        todo: asyncio.Queue[BatchLine] = asyncio.Queue()
        for line in lines:
            if line.number not in recorded:
                todo.put_nowait(line)
        resumed = bool(recorded) or batch.in_progress_at is not None
        count = min(self.settings.lines_in_flight, todo.qsize())
        feeders = [
            asyncio.create_task(self._feed(batch, todo, service, resumed)) for _ in range(count)
        ]
        try:
            return await self._watch(batch, feeders)
        finally:
            for task in feeders:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)

    def _service(self, batch: Batch) -> GenerationService:
        # A line's enqueue marker must outlive the batch: a run resumed late still dedupes.
        marker_ttl = max(3600, int(batch.expires_at - time.time()) + FINALIZE_S)
        # Durable like the API's enqueue (auto): a line lost to a failover would wait for
        # the window's end.
        queue = JobQueue(
            self.redis, self.keys, marker_ttl=marker_ttl, durability=Durability(self.redis)
        )
        api = APISettings(redis=self.settings.redis, max_queue=self.settings.max_queue)
        return GenerationService(self.redis, self.relay, api, queue=queue)

    async def _watch(self, batch: Batch, feeders: list[asyncio.Task[None]]) -> str:
        """How the batch's run ends: every line done, cancelled, or out of time."""
        while True:
            done, pending = await asyncio.wait(feeders, timeout=self.settings.poll_interval)
            for task in done:
                if not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            if not pending:
                # A feeder leaves a line unrecorded only when the window ended on it.
                return "expired" if time.time() >= batch.expires_at else "completed"
            status = await self.store.status(batch.id)
            if status == "cancelling":
                self.stop_jobs = True
                log.info("batch %s: cancelling its lines in flight", batch.id)
                return "cancelled"
            if status != "in_progress":
                raise RuntimeError(f"batch {batch.id} became {status!r} while it ran")
            if time.time() >= batch.expires_at:
                self.stop_jobs = True
                log.info("batch %s: its completion window is over", batch.id)
                return "expired"

    async def _feed(
        self,
        batch: Batch,
        todo: asyncio.Queue[BatchLine],
        service: GenerationService,
        resumed: bool,
    ) -> None:
        while not todo.empty():
            line = todo.get_nowait()
            job = line.job(batch.id, float(batch.expires_at))
            if resumed:
                await self._forget_if_lost(job)
            await self._line(batch, line, job, service)

    async def _line(
        self, batch: Batch, line: BatchLine, job: Job, service: GenerationService
    ) -> None:
        while True:
            try:
                body = await self._answer(line, job, service)
            except APIError as exc:
                if time.time() >= batch.expires_at:
                    return  # cut off by the window: the batch's end reports it
                if exc.code in PASSING or exc.status == 429:
                    log.warning("batch %s line %d: %s; retrying", batch.id, line.number, exc)
                    await asyncio.sleep(RETRY_S)
                    continue
                await self._record(batch, line, job, exc.status, exc.body())
                return
            await self._record(batch, line, job, 200, body)
            return

    async def _answer(
        self, line: BatchLine, job: Job, service: GenerationService
    ) -> dict[str, Any]:
        limit = self.settings.max_prompt_chars
        if limit > 0 and line.prompt_chars > limit:
            raise prompt_too_long(line.prompt_chars, limit, line.prompt_field)
        try:
            task = "embed" if job.kind == "embed" else "generate"
            await service.check(job.model, job.params.max_tokens, job.params.n, task)
        except APIError as exc:
            # No live worker now (a 503): the line waits in the lane for one, as queued
            # interactive jobs do, until the window ends.
            if not (exc.status == 503 and exc.code == "overloaded"):
                raise
        async with service.generate(job, lane=LANE) as run:
            try:
                if isinstance(line.request, EmbeddingRequest):
                    return await answer(run, line.request.encoding_format)
                return await run.whole()
            except BaseException:
                if not self.stop_jobs:
                    run.detach()
                raise

    async def _forget_if_lost(self, job: Job) -> None:
        """A line a dead runner had queued: if its job has finished and its chunk log has
        expired, its answer is gone, so its enqueue marker goes too and it runs again."""
        marker = self.keys.enqueued(job.model, job.id)
        entry = await self.redis.get(marker)
        if entry is None:
            return
        # A worker appends the last chunk to the log before it deletes the job's entry.
        if await self.redis.xrange(self.keys.lane_jobs(job.model, LANE), entry, entry):
            return
        if await self.redis.exists(self.keys.chunk_log(job.model, job.id)):
            return
        log.info("%s: its answer expired before this run resumed; running it again", job.id)
        await self.redis.delete(marker)

    async def _record(
        self, batch: Batch, line: BatchLine, job: Job, status: int, body: dict[str, Any]
    ) -> None:
        usage = (body.get("usage") or {}) if status == 200 else {}
        text = json.dumps(
            {
                "id": line.output_id(batch.id),
                "custom_id": line.custom_id,
                "response": {"status_code": status, "request_id": job.request_id, "body": body},
                "error": None,
            },
            separators=(",", ":"),
        )
        tokens = (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        await self.store.record(batch.id, line.number, text, status == 200, tokens)

    async def _finish(self, batch: Batch, lines: list[BatchLine], outcome: str) -> str:
        if outcome == "completed":
            moved, now = await self.store.move(batch.id, ("in_progress",), "finalizing")
            if not moved and now == "cancelling":
                outcome = "cancelled"  # the cancel came as the last line finished
        recorded = {r.line: r for r in await self.store.recorded(batch.id)}
        cut = [line for line in lines if line.number not in recorded]
        if cut and outcome == "completed":
            raise RuntimeError(f"batch {batch.id}: {len(cut)} lines ended without an answer")
        if outcome == "cancelled":
            await self._cancel_jobs(batch, cut)
        answers = [r.text for r in recorded.values() if r.ok]
        failures = [r.text for r in recorded.values() if not r.ok]
        if cut:
            failures += [_cut_off(batch, line, outcome) for line in cut]
        output_id = await self._write(batch, "output", answers)
        error_id = await self._write(batch, "error", failures)
        moved, now = await self.store.move(
            batch.id,
            ENDS[outcome],
            outcome,  # type: ignore[arg-type]
            output_file_id=output_id,
            error_file_id=error_id,
            total=len(lines),  # also for a batch cancelled before it was in progress
            completed=len(answers),
            failed=len(lines) - len(answers),
        )
        log.info(
            "batch %s: %s, %d answered, %d failed%s",
            batch.id,
            now,
            len(answers),
            len(lines) - len(answers),
            "" if moved else f" (not moved to {outcome}: it was {now})",
        )
        return now

    async def _cancel_jobs(self, batch: Batch, cut: list[BatchLine]) -> None:
        """Cancel the queued jobs of lines not done, those a dead runner queued included."""
        service = self._service(batch)
        jobs = [line.job(batch.id, 0.0) for line in cut]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.exists(self.keys.enqueued(job.model, job.id))
            queued = await pipe.execute()
        for job, was_queued in zip(jobs, queued, strict=True):
            if was_queued:
                await service.queue.cancel(job.model, job.id)

    async def _write(self, batch: Batch, kind: str, texts: list[str]) -> str | None:
        """Store one result file, or find the one a run that died after writing it left."""
        if not texts:
            return None
        current = await self.store.get(batch.id)
        pending = current.pending_files if current else {}
        if kind in pending and await self.files.get(pending[kind]):
            return pending[kind]
        writer = self.files.writer()
        await self.store.update(batch.id, pending_files={**pending, kind: writer.id})
        try:
            await writer.write(("\n".join(texts) + "\n").encode())
            expires = batch.output_expires_after or OUTPUT_EXPIRES_S
            info = await writer.commit(f"{batch.id}_{kind}.jsonl", "batch_output", expires)
        except BaseException:
            with contextlib.suppress(RedisError):
                await writer.abort()
            raise
        return info.id


def _cut_off(batch: Batch, line: BatchLine, outcome: str) -> str:
    code, message = CUT_OFF[outcome]
    item = {
        "id": line.output_id(batch.id),
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(item, separators=(",", ":"))
