from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tokenrelay.logs import bind_request_id, current_request_id

from ..deps import Authorized, Service
from ..schemas import ChatCompletionRequest, CompletionRequest
from ..streaming import respond, resume

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


# A stream cut mid-way, resumed with the Last-Event-ID header (api/resume.py): the events
# after that one, from the chunk log, then live; the job is not run again.
@router.get("/v1/chat/completions/{completion_id}/stream")
async def resume_chat_completion(completion_id: str, service: Service, request: Request) -> Any:
    return await resume(service, request, "chat", completion_id)


@router.get("/v1/completions/{completion_id}/stream")
async def resume_completion(completion_id: str, service: Service, request: Request) -> Any:
    return await resume(service, request, "completion", completion_id)
