"""`tokenrelay api`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tokenrelay.queueing.connection import RedisSettings
from tokenrelay.queueing.durability import MODES

from .settings import APISettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="redis://, rediss:// (TLS) or redis+sentinel://HOST:26379,HOST2:26379/MASTER/0 "
        "(the primary Sentinel monitors; README, Replicated Redis)",
    )
    parser.add_argument(
        "--durable-enqueue",
        choices=MODES,
        default="auto",
        help="acknowledge a request only once a Redis replica has its job (WAIT 1); auto "
        "(default): while the primary reports a connected replica; on: always (no replica: "
        "503); off: never",
    )
    parser.add_argument(
        "--durable-enqueue-timeout",
        type=int,
        default=1000,
        help="milliseconds an enqueue waits for a replica before the request gets a 503 "
        "with Retry-After (default 1000)",
    )
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)
    parser.add_argument(
        "--api-keys",
        help="comma-separated keys clients must send as "
        "'Authorization: Bearer KEY' (visible in `ps`: prefer TOKENRELAY_API_KEYS or "
        "--api-keys-file); none of the three = open",
    )
    parser.add_argument(
        "--api-keys-file",
        help="file of API keys, one per line, '#' starts a comment; adds to --api-keys",
    )
    parser.add_argument(
        "--rate-limit-rpm",
        type=int,
        default=0,
        help="requests per minute per API key (per client IP without keys); 0 = off",
    )
    parser.add_argument(
        "--rate-limit-tpm",
        type=int,
        default=0,
        help="tokens per minute per API key, charged at admission as prompt chars/4 + "
        "n * max_tokens; 0 = off",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body in bytes (default 1 MiB); 0 = no limit",
    )
    parser.add_argument(
        "--max-file-size",
        type=int,
        default=200_000_000,
        help="largest file in bytes that POST /v1/files accepts (a file is kept in Redis: "
        "its bytes plus a few hundred bytes)",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=200_000,
        help="most characters in a prompt or in all messages together (default 200000)",
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
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds open requests get to finish on SIGTERM; then a stream ends with an "
        "error event and [DONE], a waiting request gets a 503 (default 30)",
    )
    parser.add_argument(
        "--resume-grace",
        type=float,
        default=10.0,
        help="seconds a stream whose client went away keeps running for a resume "
        "(GET /v1/chat/completions/{id}/stream with Last-Event-ID) before it is cancelled; "
        "0 = cancel at once (default 10)",
    )
    parser.add_argument(
        "--batch-window",
        type=int,
        default=86400,
        help="seconds a batch has to complete, its completion_window '24h' (shorter for "
        "tests): a batch still running then ends expired, with what it has done",
    )
    parser.add_argument("--root-path", default="", help="path prefix behind a proxy")
    parser.add_argument("--log-level", default="info")


def read_keys_file(path: str) -> list[str]:
    """Keys from a file: one per line, blank lines and '#' comments skipped. A file that
    is missing or holds no key stops the server (it would otherwise run open)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SystemExit(f"tokenrelay api: cannot read the API keys file {path}: {exc}") from exc
    keys = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    keys = [k for k in keys if k]
    if not keys:
        raise SystemExit(f"tokenrelay api: the API keys file {path} holds no key")
    return keys


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-keys and the keys in --api-keys-file (each also from its TOKENRELAY_ variable,
    like every flag: see tokenrelay/envflags.py)."""
    raw = getattr(args, "api_keys", None) or ""
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    path = getattr(args, "api_keys_file", None)
    if path:
        keys += read_keys_file(path)
    return list(dict.fromkeys(keys))


def settings_from(args: argparse.Namespace) -> APISettings:
    for name in ("rate_limit_rpm", "rate_limit_tpm", "max_body_bytes", "max_prompt_chars"):
        if getattr(args, name, 0) < 0:
            raise SystemExit(f"tokenrelay api: --{name.replace('_', '-')} must be 0 or more")
    if getattr(args, "batch_window", 1) < 1:
        raise SystemExit("tokenrelay api: --batch-window must be 1 or more")
    if getattr(args, "max_file_size", 1) < 1:
        raise SystemExit("tokenrelay api: --max-file-size must be 1 or more")
    timeout_ms = getattr(args, "durable_enqueue_timeout", 1000)
    if not 1 <= timeout_ms <= 5000:
        # Below the connections' 10 s socket timeout, with room for a retry.
        raise SystemExit("tokenrelay api: --durable-enqueue-timeout must be 1 to 5000 ms")
    return APISettings(
        redis=RedisSettings(url=args.redis_url, prefix=args.key_prefix),
        durable_enqueue=getattr(args, "durable_enqueue", "auto"),
        durable_enqueue_timeout_ms=timeout_ms,
        api_keys=api_keys(args),
        rate_limit_rpm=getattr(args, "rate_limit_rpm", 0),
        rate_limit_tpm=getattr(args, "rate_limit_tpm", 0),
        max_body_bytes=getattr(args, "max_body_bytes", 1 << 20),
        max_prompt_chars=getattr(args, "max_prompt_chars", 200_000),
        max_file_size=getattr(args, "max_file_size", 200_000_000),
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
        shutdown_grace=getattr(args, "shutdown_grace", 30.0),
        resume_grace=getattr(args, "resume_grace", 10.0),
        batch_window=getattr(args, "batch_window", 86400),
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
    from .draining import DrainingServer

    settings = settings_from(args)
    # uvicorn's logging set-up keeps a logger's filters.
    logging.getLogger("uvicorn.access").addFilter(ProbeAccessFilter(settings.root_path))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=None,  # uvicorn's records go to the root handler: --log-format applies
        # Past the streams' own grace, which ends them with a terminal event first.
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 3,
    )
    DrainingServer(config, app.state.drain).run()
