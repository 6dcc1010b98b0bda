"""`tokenrelay ui`: the browser chat, arena, leaderboard and status over the public API."""

from __future__ import annotations

import argparse
import os
import sys

from tokenrelay import runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-url",
        help="the API's base URL (default: that of the `tokenrelay serve` running here, "
        f"else {runtime.DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--api-key", help="key the UI sends to the API (default: $OPENAI_API_KEY, else EMPTY)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument(
        "--redis-url",
        help="Redis for the arena's votes (default: that of the `tokenrelay serve` running "
        "here, else none: votes kept in memory, lost on exit)",
    )
    parser.add_argument("--root-path", default="", help="path prefix the UI is served under")
    parser.add_argument(
        "--export-votes",
        metavar="FILE",
        help="write the arena's votes from --redis-url to FILE as JSONL and exit",
    )
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)


def resolve_urls(args: argparse.Namespace) -> None:
    """Fill what no flag nor variable gave from the `tokenrelay serve` running here."""
    serve = runtime.running()
    args.api_url = args.api_url or (serve.api_url if serve else runtime.DEFAULT_API_URL)
    args.redis_url = args.redis_url or (serve.redis_url if serve else None)


def settings_from(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .web import UISettings

    return UISettings(
        api_url=args.api_url,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
        redis_url=args.redis_url,
        key_prefix=args.key_prefix,
        host=args.host,
        port=args.port,
        root_path=args.root_path,
    )


def run(args: argparse.Namespace) -> None:
    resolve_urls(args)
    if args.export_votes:
        _export(args)
        return
    import uvicorn

    from .web import create_app

    settings = settings_from(args)
    app = create_app(settings)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(f"tokenrelay UI at http://{host}:{settings.port}{settings.path}/", file=sys.stderr)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=3,  # open browser tabs hold streams; do not wait on them
    )


def _export(args: argparse.Namespace) -> None:
    import asyncio

    from .arena import export_jsonl

    if not args.redis_url:
        raise SystemExit("tokenrelay ui: --export-votes needs --redis-url (votes live in Redis)")
    count = asyncio.run(export_jsonl(args.redis_url, args.key_prefix, args.export_votes))
    print(f"Wrote {count} votes to {args.export_votes}", file=sys.stderr)
