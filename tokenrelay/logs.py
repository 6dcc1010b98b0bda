"""Logging for every command: ``--log-format text`` (lines for people) or ``json`` (one
object per line for a log pipeline), with the request id of the request being served.

The request id lives in a context variable: the API binds it for each HTTP request (the
client's ``X-Request-ID``, else the job id), the worker for each job it runs (one asyncio
task per job, so each task sees its own), and every record logged meanwhile carries it.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

# A mutable holder, so a route can fill in the id of the request a middleware started.
_request: ContextVar[list[str] | None] = ContextVar("tokenrelay_request_id", default=None)


def start_request(request_id: str = "") -> None:
    """Open a request scope in the current context (an HTTP request, a worker's job)."""
    _request.set([request_id])


def bind_request_id(request_id: str) -> None:
    """Name the request of the current scope (opening one if there is none)."""
    holder = _request.get()
    if holder is None:
        start_request(request_id)
    else:
        holder[0] = request_id


def current_request_id() -> str:
    holder = _request.get()
    return holder[0] if holder else ""


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "command": self.command,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            out["request_id"] = request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self, command: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {command} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} [request_id={request_id}]" if request_id else line


def setup(command: str, fmt: str = "text", level: int = logging.INFO) -> None:
    """Root logging for ``command``: one stderr handler in ``fmt``, with request ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(command) if fmt == "json" else TextFormatter(command))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: ..."): noise in the middle of a chat
    # and in serve's start-up; keep its warnings only. The openai SDK uses httpx2.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
