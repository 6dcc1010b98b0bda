"""Errors in the OpenAI shape: HTTP status + {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    counted = False  # already in tokenrelay:request_errors_total (a worker's error chunk)

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist. GET /v1/models lists the models served now.",
        code="model_not_found",
        param="model",
    )


def overloaded(message: str, retry_after: float = 2.0, status: int = 429) -> APIError:
    return APIError(
        status,
        message,
        type="server_overloaded" if status == 503 else "rate_limit_exceeded",
        code="overloaded",
        retry_after=retry_after,
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _counted(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _counted(request, _from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _counted(request, APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(
            500,
            f"Internal error: {type(exc).__name__}. See the API server log.",
            type="server_error",
        ).response()


def _counted(request: Request, exc: APIError) -> JSONResponse:
    """The error's response, counted in tokenrelay:request_errors_total by its code (a
    worker's error was counted when its chunk arrived)."""
    if not exc.counted:
        from .metrics import count_error

        count_error(request, exc.code or exc.type)
    return exc.response()


def _from_validation(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request needs a JSON body.", code="invalid_body")
    param = ".".join(loc) or None
    message = first.get("msg", "Invalid request")
    message = message.removeprefix("Value error, ")
    where = f" ('{param}')" if param else ""
    code = "unsupported_value" if first.get("type") == "unsupported_value" else "invalid_value"
    return APIError(400, f"{message}{where}", code=code, param=param)
