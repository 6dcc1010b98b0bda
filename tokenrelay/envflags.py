"""Every flag of every command also comes from an environment variable.

``--redis-url`` of any command reads ``TOKENRELAY_REDIS_URL``, ``--load-8bit`` reads
``TOKENRELAY_LOAD_8BIT``, and so on: one rule, applied to the parsers after they are
built, so a new flag gets its variable without code. The variable becomes the flag's
default (converted and checked like the flag), so a flag on the command line wins; `--help`
shows each variable, and masks the value of secrets.

``python -m tokenrelay.envflags`` prints the README's table of variables.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator, Mapping

PREFIX = "TOKENRELAY_"
SECRETS = {"api_keys", "api_key"}  # never echoed by --help
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_name(action: argparse.Action) -> str:
    """``--model-path`` -> ``TOKENRELAY_MODEL_PATH`` (the longest of the option strings)."""
    flag = max(action.option_strings, key=len)
    return PREFIX + flag.lstrip("-").replace("-", "_").upper()


def flag_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The parser's ``--flags``, without --help and --version."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if any(s.startswith("--") for s in action.option_strings):
            yield action


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser``, by command name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def apply_env(parser: argparse.ArgumentParser, environ: Mapping[str, str] = os.environ) -> None:
    """Make each flag's variable, where set, the flag's default."""
    for action in flag_actions(parser):
        raw = environ.get(env_name(action))
        if raw is not None:
            action.default = _convert(parser, action, raw)
            action.required = False


def _convert(parser: argparse.ArgumentParser, action: argparse.Action, raw: str) -> object:
    name = env_name(action)
    if action.nargs == 0:  # store_true / store_false / store_const: the flag given or not
        word = raw.strip().lower()
        if word not in TRUE | FALSE:
            parser.error(f"{name}={raw!r}: use one of 1, true, yes, on, 0, false, no, off")
        return action.const if word in TRUE else action.default
    try:
        value = action.type(raw) if callable(action.type) else raw
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{name}={raw!r}: {exc}")
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        parser.error(f"{name}={raw!r}: choose from {choices}")
    return value


class EnvArgumentParser(argparse.ArgumentParser):
    """A command's parser that takes its flags' defaults from the environment when it
    parses: only the chosen command's variables are read (``TOKENRELAY_DTYPE`` may be free
    text for ``serve`` and must be a choice for ``worker``)."""

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        apply_env(self)
        return super().parse_known_args(args, namespace)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults as argparse shows them, then ``[env: TOKENRELAY_...]``; secrets masked."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings:  # argparse prints no help line
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        if not any(s.startswith("--") for s in action.option_strings):
            return text
        if action.dest in SECRETS and action.default:
            text = text.replace("%(default)s", "****")
        return f"{text} [env: {env_name(action)}]"


def env_table(parser: argparse.ArgumentParser) -> str:
    """The markdown table of every variable, the commands that read it and their flag."""
    rows: dict[str, tuple[str, list[str]]] = {}
    for command, sub in subparsers(parser).items():
        for action in flag_actions(sub):
            if action.help == argparse.SUPPRESS:
                continue
            flag = max(action.option_strings, key=len)
            rows.setdefault(env_name(action), (flag, []))[1].append(command)
    lines = ["| Variable | Flag | Commands |", "| --- | --- | --- |"]
    for name in sorted(rows):
        flag, commands = rows[name]
        lines.append(f"| `{name}` | `{flag}` | {', '.join(commands)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from .cli import build_parser

    print(env_table(build_parser()))
