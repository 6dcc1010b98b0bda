"""X-Request-ID: the client's own id when it sends a sane one, else the job id (or a fresh
id for requests that make no job). It comes back as a response header, travels in the Job
to the worker, and tags every log record of the request (see tokenrelay/logs.py)."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenrelay.logs import bind_request_id, current_request_id, start_request

HEADER = "X-Request-ID"
SANE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")  # safe to echo and to log


def client_request_id(value: str | None) -> str:
    """The client's id if it is short and plain, else '' (one is made for it)."""
    return value if value and SANE.match(value) else ""


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start_request(client_request_id(Headers(scope=scope).get(HEADER)))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                if not current_request_id():
                    bind_request_id(f"req-{uuid.uuid4().hex}")
                MutableHeaders(scope=message)[HEADER] = current_request_id()
            await send(message)

        await self.app(scope, receive, send_with_id)
