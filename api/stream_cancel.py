"""Cancel a started stream now: ``POST /v1/chat/completions/{id}/cancel`` (and completions').

A client that leaves a started stream leaves its job running for ``--resume-grace`` seconds
(api/resume.py), so that it can come back; one that means to stop says so here (the shape
of OpenAI's ``POST /v1/responses/{id}/cancel``). The job's cancel key is set at once, as a
hang-up before the first event sets it (``JobQueue.cancel``): the worker stops within a step
and sends its cancelled error event, which every connection following the stream gets
before ``[DONE]``; a grace still pending finds the job cancelled already.

The answer is 200 with ``{"id", "object", "cancelled", "status"}``: ``cancelled`` true and
status ``cancelled`` for a stream cancelled now or before (asking twice answers the same),
false and ``completed`` for one that had ended by itself. The id is looked up in the
stream's record: an unknown id, another API key's stream and one whose chunk log lapsed get
the 404s a resume gets (``stream_not_found``, ``stream_expired``). With ``--resume-grace 0``
no record is written (a hang-up cancels at once), so every id is a 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from redis.exceptions import RedisError

from .deps import check_key
from .errors import APIError
from .resume import LOG_TTL, Resumes, not_found, owned_by
from .service import GenerationService, redis_down
from .streaming import COMPLETION_ID

OBJECT = {"chat": "chat.completion.cancel", "completion": "text_completion.cancel"}


async def cancel_stream(
    service: GenerationService, request: Request, kind: str, completion_id: str
) -> dict[str, Any]:
    """Cancel stream ``completion_id`` of endpoint ``kind`` ("chat", "completion")."""
    token = check_key(request)
    resumes: Resumes = request.app.state.resumes
    if not COMPLETION_ID[kind].fullmatch(completion_id):
        raise _unknown(completion_id)
    try:
        record = await resumes.find(completion_id)
        if record is None or record.job.kind != kind or not owned_by(record.owner, token):
            raise _unknown(completion_id)
        state = await resumes.state(record.job)
        if not state.exists:
            raise _unknown(completion_id, "its chunk log expired.", code="stream_expired")
        if not state.done and not state.cancelled:
            await service.queue.cancel(record.job.model, record.job.id)
    except RedisError as exc:
        raise redis_down(exc) from exc
    cancelled = not state.done
    return {
        "id": completion_id,
        "object": OBJECT[kind],
        "cancelled": cancelled,
        "status": "cancelled" if cancelled else "completed",
    }


def _unknown(completion_id: str, why: str = "", code: str = "stream_not_found") -> APIError:
    why = why or (
        "unknown id, or its chunk log expired (a stream is known up to "
        f"{LOG_TTL // 60} minutes after its last chunk)."
    )
    return not_found(completion_id, why, code, to="cancel")
