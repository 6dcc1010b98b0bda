from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import Authorized, Service

router = APIRouter(dependencies=Authorized)


@router.get("/v1/models")
async def list_models(service: Service) -> dict[str, Any]:
    """The models that have a live worker now."""
    models = await service.live_models()
    data = [
        {
            "id": name,
            "object": "model",
            "created": int(min(w.started_at for w in workers)),
            "owned_by": "tokenrelay",
            "max_model_len": max(w.max_context for w in workers),
            "workers": len(workers),
        }
        for name, workers in sorted(models.items())
    ]
    return {"object": "list", "data": data}
