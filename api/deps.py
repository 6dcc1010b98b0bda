"""Dependencies shared by the routes: the service and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .errors import APIError
from .service import GenerationService


def get_service(request: Request) -> GenerationService:
    return request.app.state.service  # type: ignore[no-any-return]


def require_key(request: Request) -> None:
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401, "Missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
    # compare_digest on every key: the time taken does not reveal which key nearly matched
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


Service = Annotated[GenerationService, Depends(get_service)]
Authorized = [Depends(require_key)]
