"""The Batch API: create, retrieve, list and cancel batches (run by `tokenrelay batch-worker`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from ..batches import MAX_LIST, BatchCreateRequest, BatchService, batch_object
from ..deps import check_key
from ..errors import APIError
from .files import redis_errors

router = APIRouter(dependencies=[Depends(check_key)])


def get_batches(request: Request) -> BatchService:
    return request.app.state.batches  # type: ignore[no-any-return]


Batches = Annotated[BatchService, Depends(get_batches)]


@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest, batches: Batches) -> dict[str, Any]:
    with redis_errors():
        return batch_object(await batches.create(body))


@router.get("/v1/batches")
async def list_batches(
    batches: Batches, after: str | None = None, limit: str = "20"
) -> dict[str, Any]:
    """A page of batches, newest first; page on with ``after``."""
    if not limit.isdecimal() or not 1 <= int(limit) <= MAX_LIST:
        raise APIError(
            400,
            f"'limit' must be an integer from 1 to {MAX_LIST}, not {limit!r}.",
            code="invalid_value",
            param="limit",
        )
    with redis_errors():
        found, has_more = await batches.list(after or None, int(limit))
    data = [batch_object(b) for b in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, batches: Batches) -> dict[str, Any]:
    with redis_errors():
        return batch_object(await batches.get(batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, batches: Batches) -> dict[str, Any]:
    with redis_errors():
        return batch_object(await batches.cancel(batch_id))
