"""The browser UI's client for the public API: models, status and streamed chat.

The UI is an ordinary API client (the API key travels as a Bearer token); every failure
becomes an ``ApiError`` whose ``readable()`` says what happened, never a generic
"network error". A stream left before its end (the Stop button cancels the task that reads
it) is cancelled on the API at once (``POST /v1/chat/completions/{id}/cancel``): closing the
HTTP response alone would leave the job running for the API's resume grace.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TITLES = {
    400: "The API refused the request",
    401: "The API key was refused",
    403: "The API key was refused",
    404: "The model is not served",
    429: "The server is overloaded",
    500: "The model failed on this request",
    503: "No model is ready",
}
# Where the code says more than the status does.
CODE_TITLES = {
    "rate_limit_exceeded": "This key's rate limit is used up",
    "queue_unavailable": "The API cannot reach Redis",
    "queue_timeout": "The request waited too long in the queue",
    "deadline_exceeded": "The request ran out of time",
    "worker_lost": "The worker stopped in the middle of the answer",
    "context_length_exceeded": "The conversation is too long for this model",
    "dead_lettered": "The request failed on every try",
}
CANCEL_TIMEOUT = 5.0  # seconds a Stop's cancel call may take (best effort)
HINTS = {
    401: "Start the UI with the right --api-key.",
    404: "Press the refresh button next to the model list.",
    429: "Wait a moment and send again.",
    503: "Start a worker for this model, or wait for one to come up.",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code

    def readable(self) -> str:
        """A one-paragraph Markdown message: what happened, the API's words, what to do."""
        if self.status == 0:
            return f"**Cannot reach the API.** {self.message}"
        title = CODE_TITLES.get(self.code or "") or TITLES.get(
            self.status, "The API answered with an error"
        )
        code = f" `{self.code}`" if self.code else ""
        hint = HINTS.get(self.status, "")
        return f"**{title}** (HTTP {self.status}{code}): {self.message} {hint}".strip()


@dataclass
class Usage:
    """Token counts and timings of one answer, measured on this side of the API."""

    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None

    def footer(self) -> str:
        end = self.finished or time.monotonic()
        parts = [f"{self.completion_tokens} tokens"]
        if self.first_token is not None:
            decode = end - self.first_token
            if decode > 0 and self.completion_tokens > 1:
                parts.append(f"{(self.completion_tokens - 1) / decode:.1f} tokens/s")
            parts.append(f"first token {self.first_token - self.started:.2f} s")
        parts.append(f"prompt {self.prompt_tokens} tokens")
        if self.finish_reason == "length":
            parts.append("cut at max tokens")
        return " · ".join(parts)


def _error(response_status: int, body: bytes | str) -> ApiError:
    try:
        err = json.loads(body)["error"]
        return ApiError(response_status, err.get("message") or "", err.get("code"))
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return ApiError(response_status, text.strip()[:300] or "(no message)")


class ApiClient:
    def __init__(self, base_url: str, api_key: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.timeout = httpx.Timeout(timeout, connect=5.0)

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    async def get(self, path: str) -> Any:
        try:
            async with self._client() as client:
                response = await client.get(path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            raise _error(response.status_code, response.content)
        return response.json()

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self.get("/models"))["data"]]

    async def stream_chat(
        self, model: str, messages: list[dict[str, str]], usage: Usage, **params: Any
    ) -> AsyncIterator[str]:
        """Yield the answer's text pieces; fill ``usage`` as they come."""
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params,
        }
        seen = _Seen()
        try:
            async with (
                self._client() as client,
                client.stream("POST", "/chat/completions", json=body) as response,
            ):
                if response.status_code >= 400:
                    raise _error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    for piece in _pieces(line, usage, seen):
                        yield piece
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        finally:
            if seen.id and not seen.ended:  # left early: Stop, Clear, or a broken stream
                await self.cancel_chat(seen.id)
        usage.finished = time.monotonic()

    async def cancel_chat(self, completion_id: str) -> None:
        """Stop a started chat stream's job now; best effort (if this fails, the API cancels
        it a resume grace after the stream was closed)."""
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url, headers=self.headers, timeout=CANCEL_TIMEOUT
            ) as client:
                await client.post(f"/chat/completions/{completion_id}/cancel")
        except httpx.HTTPError:
            pass

    def _unreachable(self, exc: httpx.HTTPError) -> ApiError:
        kind = type(exc).__name__
        return ApiError(
            0, f"{kind} talking to {self.base_url}: {exc or 'no answer'}. Is the API running?"
        )


@dataclass
class _Seen:
    """What a stream has shown so far: its completion id, and whether it has ended."""

    id: str | None = None
    ended: bool = False


def _pieces(line: str, usage: Usage, seen: _Seen) -> list[str]:
    if not line.startswith("data:"):
        return []
    data = line[5:].strip()
    if data == "[DONE]":
        seen.ended = True
        return []
    event = json.loads(data)
    if "error" in event:
        seen.ended = True  # an error event ends the stream: nothing left to cancel
        err = event["error"]
        # the stream already had its 200; the code tells what went wrong
        raise ApiError(500, err.get("message") or "", err.get("code"))
    seen.id = seen.id or event.get("id")
    if event.get("usage"):
        usage.prompt_tokens = event["usage"]["prompt_tokens"]
        usage.completion_tokens = event["usage"]["completion_tokens"]
    pieces = []
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            usage.finish_reason = choice["finish_reason"]
        text = (choice.get("delta") or {}).get("content")
        if text:
            if usage.first_token is None:
                usage.first_token = time.monotonic()
            pieces.append(text)
    return pieces
