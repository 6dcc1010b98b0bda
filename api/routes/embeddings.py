from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenrelay.logs import bind_request_id, current_request_id
from tokenrelay.queueing.messages import Job

from ..deps import Authorized, Service
from ..embeddings import EmbeddingRequest, answer
from ..service import GenerationService
from ..streaming import _unless_disconnected

router = APIRouter(dependencies=Authorized)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, service: Service, request: Request) -> Any:
    job = body.to_job(service.settings.request_timeout, current_request_id())
    bind_request_id(job.request_id)
    await service.check(job.model, None, task="embed")
    # a client gone before the answer cancels the job, as a completion's (api/streaming.py)
    work = _whole(service, job, body.encoding_format)
    return await _unless_disconnected(request, work, request.app.state.drain)


async def _whole(service: GenerationService, job: Job, encoding_format: str) -> JSONResponse:
    async with service.generate(job) as run:
        return JSONResponse(await answer(run, encoding_format))
