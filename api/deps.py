"""Dependencies shared by the routes: the service, the API-key check and admission limits."""

from __future__ import annotations

import hmac
import json
from typing import Annotated, Any

from fastapi import Depends, Request
from redis.exceptions import RedisError

from .errors import APIError, prompt_too_long
from .ratelimit import RateLimiter, estimate_tokens, identity, prompt_chars
from .service import GenerationService, redis_down


def get_service(request: Request) -> GenerationService:
    return request.app.state.service  # type: ignore[no-any-return]


def check_key(request: Request) -> str | None:
    """The caller's valid API key, None when no keys are configured; else a 401."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
    # compare_digest on every key: the time taken does not reveal which key nearly matched
    matched = False
    for k in keys:
        matched |= hmac.compare_digest(token.encode(), k.encode())
    if not matched:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return token


async def require_key(request: Request) -> None:
    """The key check, then for generation requests (POST) the prompt bound and the
    per-key rate limits. Runs before the body is validated: a request is charged once it
    passes the key check and the bounds."""
    token = check_key(request)
    if request.method != "POST":
        return
    settings = request.app.state.settings
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    need_body = settings.max_prompt_chars > 0 or (limiter is not None and limiter.tpm > 0)
    body: Any = None
    if need_body:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return  # invalid JSON: validation answers it, nothing is charged
    if settings.max_prompt_chars > 0:
        chars = prompt_chars(body)
        if chars > settings.max_prompt_chars:
            fields = [f for f in ("prompt", "input") if isinstance(body, dict) and f in body]
            field = fields[0] if fields else "messages"
            raise prompt_too_long(chars, settings.max_prompt_chars, field)
    if limiter is not None and limiter.enabled:
        client = request.client.host if request.client else None
        try:
            await limiter.admit(identity(token, client), estimate_tokens(body))
        except (RedisError, TimeoutError) as exc:
            raise redis_down(exc) from exc


Service = Annotated[GenerationService, Depends(get_service)]
Authorized = [Depends(require_key)]
