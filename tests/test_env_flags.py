"""Every flag of every command from TOKENRELAY_<FLAG>; the command line wins; README lists
every variable."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tokenrelay.cli import build_parser
from tokenrelay.envflags import env_name, env_table, flag_actions, subparsers

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


def test_help_shows_variables_and_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
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
        "README's variable table is stale: regenerate it with `python -m tokenrelay.envflags`"
    )
