"""Jobs a worker cannot run as asked: one it cannot read (a newer protocol version, or
malformed), and one that needs a field this release does not know (queueing/messages.py,
on upgrades). Each goes to the dead-letter stream with its reason, and its client hears
the reason at once instead of waiting out its deadline."""

from __future__ import annotations

import json
import logging

import redis.asyncio as aioredis
from pydantic import ValidationError

from tokenrelay import __version__
from tokenrelay.queueing.chunks import ChunkPublisher
from tokenrelay.queueing.consumer import Delivery, JobConsumer
from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import ErrorInfo, Job

log = logging.getLogger(__name__)


async def refuse_unknown_needs(
    redis: aioredis.Redis, keys: Keys, consumer: JobConsumer, job: Job, delivery: Delivery
) -> None:
    names = ", ".join(job.unknown_needs())
    reason = f"needs {names}, which this worker (tokenrelay {__version__}) does not know"
    log.error("refusing job %s: it %s; upgrade the worker", job.id, reason)
    # the client first: a dead-lettered job is no longer ours to write for (fencing)
    fence = consumer.fence(delivery)
    await ChunkPublisher(
        redis, keys, job.model, job.id, attempt=delivery.attempt, fence=fence
    ).send(
        error=ErrorInfo(
            message=f"The request {reason}: upgrade the model workers.",
            type="server_error",
            code="worker_outdated",
            status=503,
        )
    )
    await consumer.dead_letter(delivery, f"refused: {reason}")


async def refuse_unreadable(
    redis: aioredis.Redis,
    keys: Keys,
    consumer: JobConsumer,
    delivery: Delivery,
    exc: ValidationError,
) -> None:
    reason = reasons(exc)
    log.error("dead-lettering malformed job %s: %s", delivery.entry_id, reason)
    try:
        raw = json.loads(delivery.payload)
        job_id, model = str(raw["id"]), str(raw["model"])
    except (ValueError, KeyError, TypeError):
        job_id = model = ""  # nobody to tell: the dead letter keeps it
    if job_id:
        newer = "upgrade this process" in reason
        fence = consumer.fence(delivery)
        await ChunkPublisher(
            redis, keys, model, job_id, attempt=delivery.attempt, fence=fence
        ).send(
            error=ErrorInfo(
                message=f"The model worker could not read the request: {reason}",
                type="server_error",
                code="worker_outdated" if newer else "malformed_job",
                status=503 if newer else 500,
            )
        )
    await consumer.dead_letter(delivery, f"malformed job: {reason}")


def reasons(exc: ValidationError) -> str:
    """A validation error in one line: each field and what was wrong with it."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors())
