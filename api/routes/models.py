from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from tokenrelay.queueing.registry import WorkerInfo

from ..deps import Authorized, Service
from ..errors import model_not_found

router = APIRouter(dependencies=Authorized)


def model_object(name: str, workers: list[WorkerInfo]) -> dict[str, Any]:
    """OpenAI's model object, plus the context length and the live worker count."""
    return {
        "id": name,
        "object": "model",
        "created": int(min(w.started_at for w in workers)),
        "owned_by": "tokenrelay",
        "max_model_len": max(w.max_context for w in workers),
        "workers": len(workers),
        # each worker's weight format (--low-bit, or its dtype), as its heartbeat says
        "weights": sorted({w.weights for w in workers if w.weights}),
        # "generate" (chat, completions) or "embed" (/v1/embeddings), with the vector length
        "task": workers[0].task,
        **({"dimensions": workers[0].dimensions} if workers[0].task == "embed" else {}),
    }


@router.get("/v1/models")
async def list_models(service: Service) -> dict[str, Any]:
    """The models that have a live worker now."""
    models = await service.live_models()
    data = [model_object(name, workers) for name, workers in sorted(models.items())]
    return {"object": "list", "data": data}


# ``path``: model names may hold "/" (org/name); the openai client sends it as %2F, which
# the server decodes before routing.
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, service: Service) -> dict[str, Any]:
    """One model with a live worker now; 404 model_not_found otherwise, as in the list."""
    workers = (await service.live_models()).get(model_id)
    if not workers:
        raise model_not_found(model_id)
    return model_object(model_id, workers)
