"""`tokenrelay api`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os

from tokenrelay.queueing.connection import RedisSettings

from .settings import APISettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)
    parser.add_argument(
        "--api-keys",
        help="comma-separated keys clients must send as "
        "'Authorization: Bearer KEY' (also TOKENRELAY_API_KEYS); none = open",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="per-model queued + running jobs before new ones get 429",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take, queue wait included (default 600)",
    )
    parser.add_argument("--root-path", default="", help="path prefix behind a proxy")
    parser.add_argument("--log-level", default="info")


def settings_from(args: argparse.Namespace) -> APISettings:
    raw = args.api_keys or os.environ.get("TOKENRELAY_API_KEYS", "")
    return APISettings(
        redis=RedisSettings(url=args.redis_url, prefix=args.key_prefix),
        api_keys=[k.strip() for k in raw.split(",") if k.strip()],
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
    )


class ProbeAccessFilter(logging.Filter):
    """Drops uvicorn's access-log lines for GET /health and /ready (polled every second
    by orchestrators and by `serve` while a worker loads); keeps every other line."""

    def __init__(self, root_path: str = "") -> None:
        super().__init__()
        root = root_path.rstrip("/")
        self.paths = {f"{root}/health", f"{root}/ready", "/health", "/ready"}

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 3:
            return True
        method, path = args[1], str(args[2]).split("?", 1)[0]
        return not (method == "GET" and path in self.paths)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from .app import create_app

    settings = settings_from(args)
    # uvicorn's logging set-up keeps a logger's filters.
    logging.getLogger("uvicorn.access").addFilter(ProbeAccessFilter(settings.root_path))
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=30,
    )
