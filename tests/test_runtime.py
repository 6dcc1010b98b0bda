"""serve's runtime file, and how the other commands take their default URLs from it.

Bug (issue 10, item 3): `tokenrelay status` with no flags read redis://127.0.0.1:6379/0
while serve's Redis listened on a random port that only serve's first log line named.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenrelay import runtime
from tokenrelay.bench.run import _http_target
from tokenrelay.cli import build_parser
from tokenrelay.ui.main import resolve_urls

SERVE_REDIS = "redis://127.0.0.1:40001/0"
SERVE_API = "http://127.0.0.1:40002/v1"


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOKENRELAY_RUNTIME_DIR", str(tmp_path))
    for name in ("TOKENRELAY_REDIS_URL", "TOKENRELAY_API_URL", "TOKENRELAY_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _serve(pid: int | None = None, started_at: float = 1.0) -> runtime.ServeInfo:
    info = runtime.ServeInfo(
        SERVE_REDIS, SERVE_API, None, "demo", "/models/demo", started_at=started_at
    )
    info.pid = pid or os.getpid()  # this test process stands in for a live serve
    return info


def _exited() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_without_serve_the_defaults_are_localhost() -> None:
    assert runtime.running() is None
    assert runtime.redis_url(_args("status").redis_url) == runtime.DEFAULT_REDIS_URL
    assert runtime.api_url(_args("chat").api_url) == runtime.DEFAULT_API_URL
    ui = _args("ui")
    resolve_urls(ui)
    assert (ui.api_url, ui.redis_url) == (runtime.DEFAULT_API_URL, None)  # votes in memory
    bench = _args("bench", "--modes", "http")
    assert _http_target(bench) == ("http://127.0.0.1:8000", "bench", "synthetic")


def test_status_worker_chat_ui_bench_default_to_the_running_serve() -> None:
    path = runtime.write(_serve())
    assert path.name == f"serve-{os.getpid()}.json"
    assert runtime.redis_url(_args("status").redis_url) == SERVE_REDIS
    worker = _args("worker", "--engine", "fake")
    assert runtime.redis_url(worker.redis_url) == SERVE_REDIS
    assert runtime.api_url(_args("chat").api_url) == SERVE_API
    ui = _args("ui")
    resolve_urls(ui)
    assert (ui.api_url, ui.redis_url) == (SERVE_API, SERVE_REDIS)
    url, model, tokenizer = _http_target(_args("bench", "--modes", "http"))
    assert (url, model, tokenizer) == ("http://127.0.0.1:40002", "demo", _serve().model_path)


def test_a_flag_or_its_variable_wins_over_the_runtime_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime.write(_serve())
    given = "redis://10.0.0.1:6379/0"
    assert runtime.redis_url(_args("status", "--redis-url", given).redis_url) == given
    monkeypatch.setenv("TOKENRELAY_REDIS_URL", given)
    assert runtime.redis_url(_args("worker").redis_url) == given
    monkeypatch.setenv("TOKENRELAY_API_URL", "http://api:9000/v1")
    assert runtime.api_url(_args("chat").api_url) == "http://api:9000/v1"
    assert _http_target(_args("bench", "--api-url", "http://api:9000"))[:2] == (
        "http://api:9000",
        "bench",
    )


def test_a_stale_file_of_a_killed_serve_is_ignored() -> None:
    runtime.write(_serve(pid=_exited(), started_at=2.0))  # newer, but its serve is gone
    assert runtime.running() is None
    live = _serve(started_at=1.0)
    runtime.write(live)
    assert runtime.running() == live


def test_the_newest_live_serve_wins_and_remove_drops_only_its_own(run_dir: Path) -> None:
    parent = _serve(pid=os.getppid(), started_at=1.0)
    runtime.write(parent)
    mine = _serve(started_at=5.0)
    mine.redis_url = "redis://127.0.0.1:40003/0"
    runtime.write(mine)
    assert runtime.running() == mine
    runtime.remove(os.getpid())
    assert runtime.running() == parent
    assert [p.name for p in run_dir.iterdir()] == [f"serve-{os.getppid()}.json"]


def test_a_broken_file_is_ignored(run_dir: Path) -> None:
    (run_dir / f"serve-{os.getpid()}.json").write_text("{not json")
    assert runtime.running() is None
