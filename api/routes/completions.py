from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tokenrelay.logs import bind_request_id, current_request_id

from ..deps import Authorized, Service
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..streaming import respond

router = APIRouter(dependencies=Authorized)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, service: Service, request: Request) -> Any:
    job = body.to_job(service.settings.request_timeout, current_request_id())
    bind_request_id(job.request_id)
    await service.check(job.model, job.params.max_tokens, job.params.n)
    return await respond(service, job, body.include_usage, request)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, service: Service, request: Request) -> Any:
    job = body.to_job(service.settings.request_timeout, current_request_id())
    bind_request_id(job.request_id)
    await service.check(job.model, job.params.max_tokens, job.params.n)
    return await respond(service, job, body.include_usage, request)
