from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import Service
from ..errors import APIError

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(service: Service) -> JSONResponse:
    """Redis answers and at least one worker is live."""
    models = await service.live_models()
    if not models:
        raise APIError(
            503,
            "No worker is live yet.",
            type="server_overloaded",
            code="no_workers",
            retry_after=2,
        )
    return JSONResponse({"status": "ready", "models": sorted(models)})
