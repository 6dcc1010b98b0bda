"""Stop a started stream now, not a resume grace after its client left (api/stream_cancel.py).

Beside the resumes in routes/completions.py, but on a router of its own: the API key is
checked (cancel_stream), never charged to the key's rate limits, so that Stop works for a
key at its limit too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ..deps import Service
from ..stream_cancel import cancel_stream

router = APIRouter()


@router.post("/v1/chat/completions/{completion_id}/cancel")
async def cancel_chat_completion(completion_id: str, service: Service, request: Request) -> Any:
    return await cancel_stream(service, request, "chat", completion_id)


@router.post("/v1/completions/{completion_id}/cancel")
async def cancel_completion(completion_id: str, service: Service, request: Request) -> Any:
    return await cancel_stream(service, request, "completion", completion_id)
