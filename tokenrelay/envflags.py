"""Every flag of every command also comes from an environment variable.

``--redis-url`` of any command reads ``TOKENRELAY_REDIS_URL``, ``--load-8bit`` reads
``TOKENRELAY_LOAD_8BIT``, and so on: one rule, applied to the parsers after they are
built, so a new flag gets its variable without code. The variable becomes the flag's
default (converted and checked like the flag), so a flag on the command line wins; `--help`
shows each variable, and masks the value of secrets.

``python -P -m tokenrelay.envflags`` prints the README's table of variables (``-P``: from the
repository root, the checkout's ``tokenrelay/`` folder would shadow the installed package).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Iterator, Mapping

PREFIX = "TOKENRELAY_"
SECRETS = {"api_keys", "api_key"}  # never echoed by --help
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_name(action: argparse.Action) -> str:
    """``--model-path`` -> ``TOKENRELAY_MODEL_PATH`` (the longest of the option strings)."""
    flag = max(action.option_strings, key=len)
    return PREFIX + flag.lstrip("-").replace("-", "_").upper()


def reads_env(action: argparse.Action) -> bool:
    """Whether a variable can set the action: a ``--flag`` that stores a value (not --help
    or --version, which act instead of storing)."""
    if isinstance(action, argparse._HelpAction | argparse._VersionAction):
        return False
    return any(s.startswith("--") for s in action.option_strings)


def flag_actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The parser's ``--flags`` that read a variable."""
    return (action for action in parser._actions if reads_env(action))


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


# A default the help text states itself: "(default 8)", "(default: the folder's name)".
_STATED_DEFAULT = re.compile(r"\(default\b[^()]*\)")
# One that is just a number is replaced by the live value (a variable may have changed it).
_STATED_NUMBER = re.compile(r"\(default:? -?[0-9.]+\)")
_NO_HELP = "\0"  # stands in for a flag's missing help, which argparse would not format


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help, its default once, then ``[env: TOKENRELAY_...]``; secrets masked.

    Not ``ArgumentDefaultsHelpFormatter``: it appends ``(default: ...)`` to a help text that
    already states its default (``jobs this worker runs at once (default 8) (default: 8)``),
    prints ``(default: None)``; and ``[env: ...]`` goes only where a variable is read."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and reads_env(action):  # argparse prints no help line
            action = copy.copy(action)
            action.help = _NO_HELP
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").replace(_NO_HELP, "").strip()
        if not reads_env(action):
            return text
        text = _STATED_NUMBER.sub("(default: %(default)s)", text)
        stated = "%(default)" in text or _STATED_DEFAULT.search(text)
        if not stated and action.default not in (None, "", argparse.SUPPRESS):
            text += " (default: %(default)s)"
        if action.dest in SECRETS and action.default:
            text = text.replace("%(default)s", "****")
        return f"{text} [env: {env_name(action)}]".lstrip()


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
