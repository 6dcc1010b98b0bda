from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..deps import Service

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, service: Service) -> Response:
    """Prometheus text format; open, like /health (see README, Operations)."""
    body = await request.app.state.metrics.render(service.status)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
