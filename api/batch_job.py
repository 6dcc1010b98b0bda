"""The RQ job of a batch, as `tokenrelay batch-worker` runs it (RQ is synchronous: the job
runs the asyncio BatchRunner to the batch's end), and RQ's failure callback."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tokenrelay.queueing.batch_queue import fail_batch
from tokenrelay.queueing.connection import connect
from tokenrelay.queueing.relay import ChunkRelay

from .batch_runner import BatchRunner, RunnerSettings

log = logging.getLogger(__name__)

_settings: RunnerSettings | None = None


def configure(settings: RunnerSettings) -> None:
    """Set by `tokenrelay batch-worker` before it takes jobs (RQ passes only the id)."""
    global _settings
    _settings = settings


def run_batch(batch_id: str) -> str:
    """The RQ job: run (or resume) one batch to its end; returns its final status."""
    if _settings is None:
        raise RuntimeError("run_batch runs in `tokenrelay batch-worker`, which configures it")
    return asyncio.run(_run(_settings, batch_id))


def batch_job_failed(job: Any, connection: Any, exc_type: Any, exc: Any, tb: Any) -> None:
    """RQ's failure callback: a job with retries left runs again; the last failure fails
    the batch, so it does not stay in_progress for ever."""
    batch_id = job.args[0]
    if job.retries_left:
        log.warning(
            "batch %s: its run failed (%s: %s); RQ runs it again (%d retries left)",
            batch_id,
            getattr(exc_type, "__name__", exc_type),
            exc,
            job.retries_left,
        )
        return
    reason = f"The batch runner failed and has no retry left: {exc}. See the batch worker log."
    if _settings is not None and fail_batch(connection, _settings.redis.keys, batch_id, reason):
        log.error("batch %s failed for good: %s", batch_id, exc)


async def _run(settings: RunnerSettings, batch_id: str) -> str:
    redis = connect(settings.redis)
    file_redis = connect(settings.redis, decode_responses=False)
    relay = ChunkRelay(redis, settings.redis.keys)
    await relay.start()
    try:
        return await BatchRunner(settings, redis, file_redis, relay).run(batch_id)
    finally:
        await relay.close()
        await redis.aclose()
        await file_redis.aclose()
