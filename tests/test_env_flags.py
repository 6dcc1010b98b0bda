"""Every flag of every command from TOKENRELAY_<FLAG>; the command line wins; README lists
every variable."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tokenrelay.cli import COMMANDS, build_parser
from tokenrelay.envflags import (
    EnvArgumentParser,
    HelpFormatter,
    env_name,
    env_table,
    flag_actions,
    reads_env,
    subparsers,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def _sample(action: argparse.Action) -> tuple[str, object]:
    """A value for the variable, and what the flag's dest should then hold."""
    if action.nargs == 0:
        return "true", action.const
    if action.choices:
        choice = [c for c in action.choices if c != action.default][0]
        return str(choice), choice
    if action.type is int:
        return "7", 7
    if action.type is float:
        return "2.5", 2.5
    return "from-env", "from-env"


def _all_flags() -> list[tuple[str, argparse.Action]]:
    return [(cmd, a) for cmd, p in subparsers(build_parser()).items() for a in flag_actions(p)]


@pytest.mark.parametrize(
    ("command", "dest"), [(cmd, a.dest) for cmd, a in _all_flags()], ids=lambda x: str(x)
)
def test_every_flag_reads_its_variable(
    command: str, dest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    action = next(a for a in flag_actions(subparsers(build_parser())[command]) if a.dest == dest)
    raw, expected = _sample(action)
    monkeypatch.setenv(env_name(action), raw)
    args = build_parser().parse_args([command])
    assert getattr(args, dest) == expected


def test_command_line_wins_and_values_are_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_REDIS_URL", "redis://env:6379/0")
    monkeypatch.setenv("TOKENRELAY_LIMIT_WORKER_CONCURRENCY", "12")
    monkeypatch.setenv("TOKENRELAY_LOAD_8BIT", "off")
    args = build_parser().parse_args(["worker"])
    assert args.redis_url == "redis://env:6379/0"
    assert args.limit_worker_concurrency == 12 and args.load_8bit is False
    args = build_parser().parse_args(["worker", "--redis-url", "redis://cli:1/0"])
    assert args.redis_url == "redis://cli:1/0"
    args = build_parser().parse_args(["worker", "--limit-worker-concurrency", "3"])
    assert args.limit_worker_concurrency == 3


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("TOKENRELAY_PORT", "eighty", "TOKENRELAY_PORT='eighty'"),
        ("TOKENRELAY_DEVICE", "tpu", "choose from cpu, cuda, xpu, mps"),
        ("TOKENRELAY_TRUST_REMOTE_CODE", "maybe", "use one of 1, true"),
    ],
)
def test_bad_values_are_refused_by_name(
    name: str, value: str, says: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv(name, value)
    command = "worker" if name != "TOKENRELAY_PORT" else "api"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command])
    assert says in capsys.readouterr().err


def test_help_shows_variables_and_masks_secrets(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TOKENRELAY_API_KEYS", "sekrit-key")
    monkeypatch.setenv("TOKENRELAY_MAX_QUEUE", "99")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["api", "--help"])
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "[env: TOKENRELAY_REDIS_URL]" in out and "[env: TOKENRELAY_LOG_FORMAT]" in out
    assert "(default: 99)" in out
    assert "sekrit" not in out and "(default: ****)" in out


def test_api_keys_come_only_through_the_flag_mechanism() -> None:
    source = (README.parent / "api" / "main.py").read_text()
    assert "os.environ" not in source  # folded into tokenrelay/envflags.py


def test_readme_table_matches_the_parsers() -> None:
    text = README.read_text()
    start, end = "<!-- env-table:start -->", "<!-- env-table:end -->"
    assert start in text and end in text, "README lacks the generated variable table"
    table = text.split(start, 1)[1].split(end, 1)[0].strip()
    assert table == env_table(build_parser()), (
        "README's variable table is stale: regenerate it with `python -P -m tokenrelay.envflags`"
    )


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return re.sub(r"\s+", " ", parser._get_formatter()._format_action(action)).strip()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_states_each_default_once_and_no_variable_for_help(command: str) -> None:
    """Bug: `worker --help` said `jobs this worker runs at once (default 8) (default: 8)` (a
    default in the help text, and the formatter's own), `(default: None)` where there is
    none, and `-h, --help ... [env: TOKENRELAY_HELP]`, a variable nothing reads."""
    parser = subparsers(build_parser())[command]
    for action in parser._actions:
        text = _help_of(parser, action)
        assert text.count("(default") <= 1, text
        assert "(default: None)" not in text and "(default: )" not in text, text
        assert text.count("[env: ") == (1 if reads_env(action) else 0), text
        number = isinstance(action.default, int | float) and not isinstance(action.default, bool)
        in_words = "(default 1 MiB)" in text  # --max-body-bytes
        if number and action.help != argparse.SUPPRESS and not in_words:
            assert f"(default: {action.default})" in text, text  # the live value
    assert "TOKENRELAY_HELP" not in parser.format_help()


def test_help_shows_a_default_a_variable_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A help text's own `(default 8)` shows the value TOKENRELAY_<FLAG> set; one in words
    stays as written, with no second default after it."""
    parser = EnvArgumentParser(prog="tokenrelay worker", formatter_class=HelpFormatter)
    parser.add_argument("--slots", type=int, default=8, help="jobs at once (default 8)")
    parser.add_argument("--name", help="a name (default: the folder's)")
    monkeypatch.setenv("TOKENRELAY_SLOTS", "12")
    parser.parse_known_args([])  # reads the variables, as parsing `--help` does
    slots, name = (_help_of(parser, a) for a in parser._actions[1:])
    assert slots.endswith("jobs at once (default: 12) [env: TOKENRELAY_SLOTS]"), slots
    assert name.endswith("a name (default: the folder's) [env: TOKENRELAY_NAME]"), name


def _readme_flag_tables() -> dict[str, dict[str, str]]:
    """Each command's `| Flag | Default | Meaning |` table in README: flag -> default cell.
    A table belongs to the first `tokenrelay COMMAND` of its section (`## Browser UI`:
    "`tokenrelay ui` is a Gradio app")."""
    text = README.read_text()
    tables: dict[str, dict[str, str]] = {}
    header = "| Flag | Default | Meaning |"
    for part in text.split(header)[1:]:
        section = re.split(r"^##+ ", text[: text.index(header + part)], flags=re.M)[-1]
        command = re.findall(r"`tokenrelay ([\w-]+)", section)[0]
        rows = tables.setdefault(command, {})
        for line in part.split("\n\n", 1)[0].splitlines()[2:]:
            flag, default = re.match(r"\| `(--[\w-]+)[^`]*` \| (.*?) \|", line).groups()
            rows[flag] = default
    return tables


def _documents(cell: str, default: object) -> bool:
    """Whether README's default cell says ``default``: a literal (`0.05`, `0` (off)) is
    compared; words (`the demo model`, `$OPENAI_API_KEY`, else ...) are taken as written."""
    literal = re.fullmatch(r"`([^`$]+)`( \(.*\))?", cell)
    if literal is None:
        return cell not in ("off", "none", "empty") or default in (None, False, "")
    if isinstance(default, int | float) and not isinstance(default, bool):
        return float(literal.group(1)) == default
    return literal.group(1) == str(default)


def test_readme_flag_tables_match_the_parsers() -> None:
    """Bug: README said `--chunk-interval` defaults to 0.02; the worker's is 0.05. Every
    flag `--help` shows has a row in its command's README table, with the parser's default."""
    tables = _readme_flag_tables()
    assert set(tables) == set(COMMANDS), f"README has flag tables for {sorted(tables)}"
    for command, parser in subparsers(build_parser()).items():
        shown = {
            max(a.option_strings, key=len): a
            for a in flag_actions(parser)
            if a.help != argparse.SUPPRESS and a.dest != "log_format"
        }
        rows = tables[command]
        assert set(rows) == set(shown), f"README's `{command}` table differs from --help"
        for flag, action in shown.items():
            assert _documents(rows[flag], action.default), (
                f"README: `{command} {flag}` defaults to {rows[flag]}; "
                f"the parser says {action.default!r}"
            )
