from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import Authorized, Service

router = APIRouter(dependencies=Authorized)


@router.get("/v1/status")
async def status(service: Service) -> dict[str, Any]:
    """Models (workers, queued, running, tokens/s, dead letters) and live workers."""
    return (await service.status()).model_dump()
