"""The Batch API's service: create, read, list and cancel batches, and OpenAI's batch object.

Creating a batch stores its record (``validating``) and queues its RQ job; a batch worker
does the rest (api/batch_runner.py). Cancelling marks the record; the runner sees it within
its poll interval, or, for a batch no runner holds yet, the record is cancelled at once.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import anyio
import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenrelay.queueing import batch_queue
from tokenrelay.queueing.batches import Batch, BatchStore, is_batch_id
from tokenrelay.queueing.cluster import is_cluster
from tokenrelay.queueing.files import FileStore

from .batch_lines import SCHEMAS
from .errors import APIError
from .settings import APISettings

log = logging.getLogger(__name__)

ENDPOINTS = tuple(SCHEMAS)
MAX_LIST = 100
NOT_CANCELLABLE = ("completed", "failed", "expired", "finalizing")


class OutputExpiresAfter(BaseModel):
    anchor: str
    seconds: Annotated[int, Field(ge=3600, le=30 * 86400)]

    @field_validator("anchor")
    @classmethod
    def _created_at(cls, v: str) -> str:
        if v != "created_at":
            raise ValueError(f"anchor must be 'created_at', not {v!r}")
        return v


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    input_file_id: Annotated[str, Field(min_length=1)]
    endpoint: str
    completion_window: str
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    output_expires_after: OutputExpiresAfter | None = None

    @field_validator("endpoint")
    @classmethod
    def _served(cls, v: str) -> str:
        if v not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, not {v!r}")
        return v

    @field_validator("completion_window")
    @classmethod
    def _window(cls, v: str) -> str:
        if v != "24h":
            raise ValueError(f"completion_window must be '24h', not {v!r}")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v and len(v) > 16:
            raise ValueError(f"metadata takes at most 16 keys, not {len(v)}")
        if v and any(len(k) > 64 for k in v):
            raise ValueError("metadata keys are at most 64 characters")
        return v


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's batch object."""
    errors = None
    if batch.errors:
        errors = {"object": "list", "data": [e.model_dump() for e in batch.errors]}
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "model": batch.model,
        "errors": errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": batch.created_at,
        "in_progress_at": batch.in_progress_at,
        "expires_at": batch.expires_at,
        "finalizing_at": batch.finalizing_at,
        "completed_at": batch.completed_at,
        "failed_at": batch.failed_at,
        "expired_at": batch.expired_at,
        "cancelling_at": batch.cancelling_at,
        "cancelled_at": batch.cancelled_at,
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "usage": {
            "input_tokens": batch.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": batch.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": batch.input_tokens + batch.output_tokens,
        },
        "metadata": batch.metadata,
    }


def batch_not_found(batch_id: str) -> APIError:
    return APIError(404, f"No such Batch object: {batch_id}", code="batch_not_found", param="id")


class BatchService:
    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        rq_redis: redis.Redis,
        settings: APISettings,
    ) -> None:
        self.store = store
        self.files = files
        self.rq_redis = rq_redis  # synchronous: RQ has no asyncio client
        self.settings = settings

    async def create(self, body: BatchCreateRequest) -> Batch:
        if is_cluster(self.rq_redis):
            raise APIError(
                501,
                "The Batch API is not available on a Redis Cluster: RQ, which runs batches, "
                "needs a standalone or Sentinel-managed Redis.",
                type="server_error",
                code="batches_unavailable",
            )
        info = await self.files.get(body.input_file_id)
        if info is None:
            raise APIError(
                404,
                f"No such File object: {body.input_file_id}",
                code="file_not_found",
                param="input_file_id",
            )
        if info.purpose != "batch":
            raise APIError(
                400,
                f"The file {info.id} has purpose '{info.purpose}'; a batch reads a file "
                "uploaded with purpose 'batch'.",
                code="invalid_value",
                param="input_file_id",
            )
        now = int(time.time())
        batch = Batch(
            id=self.store.new_id(),
            endpoint=body.endpoint,
            input_file_id=info.id,
            completion_window=body.completion_window,
            status="validating",
            created_at=now,
            expires_at=now + self.settings.batch_window,
            metadata=body.metadata,
            output_expires_after=(
                body.output_expires_after.seconds if body.output_expires_after else None
            ),
        )
        await self.store.create(batch)
        try:
            await anyio.to_thread.run_sync(self._enqueue, batch.id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.store.delete(batch.id)
            raise
        return batch

    def _enqueue(self, batch_id: str) -> None:
        batch_queue.enqueue(
            self.rq_redis, self.settings.redis.keys, batch_id, self.settings.batch_window
        )

    async def get(self, batch_id: str) -> Batch:
        batch = await self.store.get(batch_id)
        if batch is None:
            raise batch_not_found(batch_id)
        return await self._unclaimed_expired(batch)

    async def list(self, after: str | None, limit: int) -> tuple[list[Batch], bool]:
        found, has_more = await self.store.list(limit, after)
        return [await self._unclaimed_expired(b) for b in found], has_more

    async def _unclaimed_expired(self, batch: Batch) -> Batch:
        """A batch that no batch worker took up before its window ended (none is running)
        would read ``validating`` for ever: it ends ``expired`` when it is read, with no
        lines run, as OpenAI's does. A batch worker that takes it up later finds it ended;
        one that holds it (its lease) ends it itself."""
        if batch.status != "validating" or time.time() < batch.expires_at:
            return batch
        if await self.store.leased(batch.id):
            return batch
        moved, _ = await self.store.move(batch.id, ("validating",), "expired")
        if moved:
            log.warning(
                "batch %s expired before any batch worker took it up: is `tokenrelay "
                "batch-worker` running against this Redis? (`tokenrelay serve` starts one)",
                batch.id,
            )
        return await self.store.get(batch.id) or batch

    async def cancel(self, batch_id: str) -> Batch:
        status = await self.store.cancel(batch_id) if is_batch_id(batch_id) else ""
        if not status:
            raise batch_not_found(batch_id)
        if status in NOT_CANCELLABLE:
            raise APIError(
                400,
                f"The batch {batch_id} is {status}; only a validating or in_progress batch "
                "can be cancelled.",
                code="invalid_state",
                param="id",
            )
        return await self.get(batch_id)
