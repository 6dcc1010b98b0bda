"""`tokenrelay serve` and `tokenrelay chat`, run exactly as the README tells a new user."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tokenrelay.embedded_redis import free_port

from .conftest import DEMO_MODEL


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while "tokenrelay is ready" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield url, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_serve_prints_url_and_answers(served) -> None:  # type: ignore[no-untyped-def]
    url, _, log = served
    text = log.read_text()
    assert f"{url}/v1" in text and "curl" in text
    r = httpx.post(
        f"{url}/v1/chat/completions",
        timeout=60,
        json={
            "model": DEMO_MODEL,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        },
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_chat_cli_streams_and_resets(served) -> None:  # type: ignore[no-untyped-def]
    url, _, _ = served
    session = "What is the capital of France?\n!!reset\nWhat is the capital of France?\n!!exit\n"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenrelay",
            "chat",
            "--api-url",
            f"{url}/v1",
            "--temperature",
            "0",
        ],
        input=session,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Paris") == 2, done.stdout
    assert "conversation reset" in done.stderr


def test_ctrl_c_stops_everything(served) -> None:  # type: ignore[no-untyped-def]
    _, proc, _ = served
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # redis-server, worker, api
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
