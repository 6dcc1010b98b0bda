"""Errors in the OpenAI shape: HTTP status + {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
from typing import Any

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


def prompt_too_long(chars: int, limit: int, field: str) -> APIError:
    """A prompt over ``--max-prompt-chars`` (``field``: "prompt" or "messages")."""
    return APIError(
        400,
        f"The prompt has {chars} characters; this server accepts at most {limit}.",
        code="prompt_too_long",
        param=field,
    )


def wrong_task(model: str, task: str) -> APIError:
    """A request to a model that does the other thing: ``task`` is what its workers do."""
    if task == "embed":
        message = (
            f"'{model}' is an embedding model: it serves POST /v1/embeddings, not chat or "
            "text completions."
        )
    else:
        message = (
            f"'{model}' generates text (chat, completions): POST /v1/embeddings needs an "
            "embedding model (a worker started with --task embed)."
        )
    return APIError(400, message, code="model_task_mismatch", param="model")


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
        return _counted(request, _from_validation(exc, request))

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


def _from_validation(exc: RequestValidationError, request: Request) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "Invalid request.", code="invalid_value")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.", code="invalid_json")
    loc = _field_path(first.get("loc", ()))
    if first.get("type") == "missing" and not loc:
        return APIError(400, "The request needs a JSON body.", code="invalid_body")
    if first.get("type") == "model_attributes_type" and not loc:
        return _body_not_an_object(first.get("input"), request)
    return invalid_field(errors)


def invalid_field(errors: list[Any]) -> APIError:
    """A 400 naming the field at fault, from pydantic's errors for a JSON object (a request
    body, or the body of a batch's line)."""
    loc = _field_path(errors[0].get("loc", ()))
    loc, message, kind = _explain([e for e in errors if _field_path(e["loc"])[: len(loc)] == loc])
    param = _param(loc) or None
    where = f" ('{param}')" if param else ""
    code = "unsupported_value" if kind == "unsupported_value" else "invalid_value"
    return APIError(400, f"{message}{where}", code=code, param=param)


def _is_union_tag(part: str) -> bool:
    """Whether a pydantic error location part names a member of a union (``str``,
    ``list[TextPart]``, ``function-after[...]``, a model class) rather than a field: the
    request fields are all lower-case names."""
    return not part.isidentifier() or part[:1].isupper() or part in _TYPE_NAMES


_TYPE_NAMES = {"str", "int", "float", "bool", "bytes", "dict", "list", "none"}


def _field_path(loc: tuple[int | str, ...] | list[int | str]) -> tuple[int | str, ...]:
    """The location of an error in the request body, without "body" and union tags."""
    return tuple(
        p for p in loc if isinstance(p, int) or (p != "body" and not _is_union_tag(str(p)))
    )


def _param(path: tuple[int | str, ...]) -> str:
    """OpenAI's way of naming a field: ``messages[0].content``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _explain(errors: list[Any]) -> tuple[tuple[int | str, ...], str, str]:
    """Where and what, from the errors of one field. A union reports one error per member:
    the member matching the value's type complains about the value itself (a list too long,
    an item wrong), which says more than the others' type mismatches; when every member
    only rejects the type, their wishes are joined ("a valid string or a valid list")."""
    about_value = [e for e in errors if not str(e["type"]).endswith("_type")]
    if about_value:
        best = about_value[0]
        message = str(best["msg"]).removeprefix("Value error, ")
        return _field_path(best["loc"]), message, str(best["type"])
    wanted = " or ".join(
        dict.fromkeys(str(e["msg"]).removeprefix("Input should be ") for e in errors)
    )
    return _field_path(errors[0]["loc"]), f"Input should be {wanted}", str(errors[0]["type"])


def _body_not_an_object(body: object, request: Request) -> APIError:
    if isinstance(body, bytes):  # FastAPI parses JSON only when the content type says so
        content_type = request.headers.get("content-type")
        got = f"Content-Type '{content_type}'" if content_type else "no Content-Type header"
        message = (
            "The request body must be JSON sent with 'Content-Type: application/json'; this "
            f"request has {got}."
        )
    else:
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(body), "a number")
        message = f"The request body must be a JSON object, not {kind}."
    return APIError(400, message, code="invalid_body")
