"""The `tokenrelay` command: one entry point, a subcommand per process."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__

COMMANDS = {
    "serve": ("tokenrelay.serve", "Redis + worker + API in one command (the quick start)"),
    "api": ("tokenrelay.api.main", "the OpenAI-compatible HTTP server"),
    "worker": ("tokenrelay.workers.main", "a model worker that consumes a model's job stream"),
    "chat": ("tokenrelay.ui.terminal", "chat with a served model in the terminal"),
    "ui": ("tokenrelay.ui.main", "the browser chat, arena and status page (Gradio)"),
    "bench": ("tokenrelay.bench.run", "load-test engines and the stack side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Serve LLMs behind an OpenAI-compatible API, with Redis streams between "
        "the API and any number of model workers.",
    )
    parser.add_argument("--version", action="version", version=f"tokenrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    import importlib

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {args.command} %(name)s: %(message)s",
    )
    # httpx logs every request at INFO ("HTTP Request: ..."): noise in the middle of a chat
    # and in serve's start-up; keep its warnings only. The openai SDK uses httpx2.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    importlib.import_module(args.module).run(args)
