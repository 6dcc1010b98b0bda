"""Running one embed job on a worker: its vectors go out as chunks, a pass at a time.

The chunks are those of a generation (queueing/chunks.py): numbered, logged, fenced, each
reading the cancel key; a vector rides in ``ChoiceDelta.embedding`` at its input's index.
The last chunk carries the usage (prompt tokens only) and ``done``. A re-delivered job runs
again from the start on its newer attempt (workers/continuation.py: not a stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from tokenrelay.queueing.chunks import ChunkPublisher
from tokenrelay.queueing.consumer import Delivery
from tokenrelay.queueing.fencing import LostDelivery
from tokenrelay.queueing.messages import ErrorInfo, Job, Usage

from .engine import Engine, InvalidRequest

log = logging.getLogger(__name__)

OnFailure = Callable[[Delivery, ChunkPublisher, Exception], Awaitable[None]]


async def run_embed(
    engine: Engine,
    job: Job,
    delivery: Delivery,
    publisher: ChunkPublisher,
    engine_failed: OnFailure,
) -> None:
    started = time.monotonic()
    if getattr(engine, "task", "generate") != "embed":
        await publisher.send(
            error=ErrorInfo(
                message=f"'{job.model}' generates text: POST /v1/embeddings needs an "
                "embedding model (a worker started with --task embed).",
                type="invalid_request_error",
                code="model_task_mismatch",
                status=400,
                param="model",
            )
        )
        return
    handle = engine.submit(job, background=delivery.lane == "batch")
    usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    left = len(job.input or [])
    try:
        async for events in handle.stream():
            deltas = [d for event in events for d in event.deltas]
            left -= len(deltas)
            tokens = events[-1].prompt_tokens
            usage = Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
            if time.time() > job.deadline:
                engine.cancel(job.id)
                await publisher.send(error=ErrorInfo.deadline_exceeded())
                return
            if await publisher.send(deltas, tokens=usage):
                log.info("job %s cancelled by its client", job.id)
                engine.cancel(job.id)
                return
    except InvalidRequest as exc:
        await publisher.send(error=exc.error())
        return
    except (RedisError, LostDelivery):
        raise  # not the model's fault: the job stays pending and runs again
    except Exception as exc:
        log.exception("engine failed on embed job %s (attempt %d)", job.id, delivery.attempt)
        await engine_failed(delivery, publisher, exc)
        return
    if left:  # the engine ended the job early: cancelled
        return
    await publisher.send(usage=usage, done=True)
    log.info(
        "job %s done: %d inputs, %d tokens embedded in %.2fs",
        job.id,
        len(job.input or []),
        usage.prompt_tokens,
        time.monotonic() - started,
    )
