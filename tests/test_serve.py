"""`tokenrelay serve` and `tokenrelay chat`, run exactly as the README tells a new user."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import free_port

from .conftest import DEMO_MODEL
from .stack import Stack


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model: Path):  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    out = open(log, "wb")
    proc = subprocess.Popen(
        [*tokenrelay_argv(), "serve", "--port", str(port)],
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
    # Bug: serve's /ready polling printed an httpx "HTTP Request" line and an API access
    # line per poll while the worker loaded, burying the banner.
    assert "HTTP Request" not in text
    assert "GET /ready" not in text
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
            *tokenrelay_argv(),
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


def test_a_killed_worker_is_started_again_and_loses_nothing(served) -> None:  # type: ignore[no-untyped-def]
    """Bug: serve stopped the API, the UI and Redis as soon as one worker died, so every
    client got a connection error. Now the worker is started again; its jobs, left pending
    by the dead one, are reclaimed once its heartbeat lapses, and every request is answered."""
    import concurrent.futures

    url, proc, log = served

    def ask(i: int) -> int:
        body = {"model": DEMO_MODEL, "prompt": f"Count to {i + 3}:", "max_tokens": 24}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=180).status_code

    worker = next(
        p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline()
    )
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(ask, i) for i in range(6)]
        time.sleep(1.0)
        worker.kill()
        codes = [a.result() for a in answers]
    assert codes == [200] * 6
    assert proc.poll() is None
    assert "starting it again" in log.read_text(errors="replace")
    assert httpx.get(f"{url}/ready", timeout=5).status_code == 200


def _until_200(
    send: Callable[[], httpx.Response], log: Path, between: tuple[int, ...] | None = None
) -> None:
    """Send until the answer is a 200 (60 s at most); connection errors are retried, and
    other answers must be one of ``between`` (any, if None)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            r = send()
            if r.status_code == 200:
                return
            assert between is None or r.status_code in between, r.text
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)


def test_a_killed_redis_is_started_again(served) -> None:  # type: ignore[no-untyped-def]
    """serve's own Redis, SIGKILLed: serve starts it again on the same port from its
    append-only file, and the API and the worker reconnect by themselves."""
    url, proc, log = served
    server = next(
        p for p in psutil.Process(proc.pid).children() if "redis-server" in p.name()
    )
    server.kill()
    body = {"model": DEMO_MODEL, "prompt": "The capital of France is", "max_tokens": 8}
    # while Redis is down: a clean 503
    _until_200(lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60), log, (503,))
    assert proc.poll() is None
    assert "redis-server exited" in log.read_text(errors="replace")


def test_a_killed_api_is_started_again(served) -> None:  # type: ignore[no-untyped-def]
    url, proc, log = served
    api = next(p for p in psutil.Process(proc.pid).children() if "api" in p.cmdline())
    api.kill()
    _until_200(lambda: httpx.get(f"{url}/ready", timeout=5), log)
    assert proc.poll() is None
    assert "the API exited" in log.read_text(errors="replace")


def test_ctrl_c_stops_everything(served) -> None:  # type: ignore[no-untyped-def]
    _, proc, _ = served
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 3  # redis-server, worker, api
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


def test_chat_cli_prints_no_http_log_lines(stack: Stack) -> None:
    """Bug: `tokenrelay chat` printed httpx's INFO lines ("HTTP Request: POST ...") in the
    middle of the conversation."""
    stack.api()
    stack.fake_worker()
    done = subprocess.run(
        [*tokenrelay_argv(), "chat", "--api-url", f"{stack.url}/v1"],
        input="hello\nhello again\n!!exit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("ASSISTANT: t0.") == 2, done.stdout  # the fake model answered
    assert "HTTP Request" not in done.stdout + done.stderr, done.stderr


def test_api_access_log_leaves_out_probes(stack: Stack) -> None:
    """Bug: the API logged an access line for every /health and /ready poll (serve polls
    /ready while the worker loads); other requests are still logged."""
    api = stack.api()
    for _ in range(3):
        httpx.get(f"{stack.url}/ready", timeout=5)  # 503: no worker yet
    stack.fake_worker()
    stack.wait_http("/ready", api)
    httpx.get(f"{stack.url}/health?probe=1", timeout=5)
    assert httpx.get(f"{stack.url}/v1/models", timeout=5).status_code == 200
    assert httpx.get(f"{stack.url}/nowhere", timeout=5).status_code == 404
    deadline = time.monotonic() + 5
    while "GET /nowhere" not in api.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = api.output()
    assert "GET /v1/models" in text and "GET /nowhere" in text, text
    assert "GET /ready" not in text and "GET /health" not in text, text
