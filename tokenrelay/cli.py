"""The `tokenrelay` command: one entry point, a subcommand per process."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .envflags import EnvArgumentParser, HelpFormatter

COMMANDS = {
    "serve": ("tokenrelay.serve", "Redis + worker + API in one command (the quick start)"),
    "api": ("tokenrelay.api.main", "the OpenAI-compatible HTTP server"),
    "worker": ("tokenrelay.workers.main", "a model worker that consumes a model's job stream"),
    "chat": ("tokenrelay.ui.terminal", "chat with a served model in the terminal"),
    "ui": ("tokenrelay.ui.main", "the browser chat, arena and status page (Gradio)"),
    "batch-worker": ("tokenrelay.batch_worker", "an RQ worker that runs Batch API jobs"),
    "batch": ("tokenrelay.batch_cli", "run a batch file through the Batch API, with progress"),
    "status": ("tokenrelay.status", "workers, models, queues and tokens/s in a table, from Redis"),
    "bench": ("tokenrelay.bench.run", "load-test engines and the stack side by side"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``only``, that command's flags alone: building the
    worker's imports torch (3 s of CPU), which an API or UI process started by name skips."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="tokenrelay",
        description="Serve LLMs behind an OpenAI-compatible API, with Redis streams between "
        "the API and any number of model workers.",
    )
    parser.add_argument("--version", action="version", version=f"tokenrelay {__version__}")
    # Every flag also from TOKENRELAY_<FLAG> (the command line wins): see envflags.py.
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=EnvArgumentParser
    )
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
        )
        if only in (None, name):
            importlib.import_module(module).add_arguments(p)
        p.add_argument(
            "--log-format",
            default="text",
            choices=["text", "json"],
            help="text lines, or JSON lines (with request_id where known)",
        )
        p.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    import importlib

    from .logs import setup

    given = sys.argv[1:] if argv is None else argv
    # The first word that is not a flag names the command (the top level takes no values).
    command = next((a for a in given if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    setup(args.command, args.log_format)
    os.environ["TOKENRELAY_LOG_FORMAT"] = args.log_format  # for the processes serve starts
    importlib.import_module(args.module).run(args)
