"""`tokenrelay serve` and `tokenrelay chat`, run exactly as the README tells a new user."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tokenrelay import runtime
from tokenrelay.cli import build_parser
from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import free_port
from tokenrelay.serve import banner

from .conftest import DEMO_MODEL
from .stack import Stack

README = Path(__file__).resolve().parents[1] / "README.md"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def run_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of this module's serve and of the commands that look for it: a
    runtime folder of its own, so no other serve on this machine is found."""
    run_dir = tmp_path_factory.mktemp("run")
    return {**os.environ, "TOKENRELAY_RUNTIME_DIR": str(run_dir)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model: Path, run_env):  # type: ignore[no-untyped-def]
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    out = open(log, "wb")
    # Started the way a shell starts `tokenrelay serve &`: SIGINT ignored (inherited), and
    # in a process group of its own, to be signalled as a whole like a terminal's Ctrl-C.
    proc = subprocess.Popen(
        [*tokenrelay_argv(), "serve", "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=run_env,
        preexec_fn=_ignore_sigint,
        start_new_session=True,
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


def test_the_banners_curl_answers_on_topic(served) -> None:  # type: ignore[no-untyped-def]
    """Bug (issue 10, item 4): the banner's curl left the temperature at 1, and the demo
    model answered it off topic 4 times in 4; pasted as printed, it now says Paris."""
    _, _, log = served
    text = log.read_text()
    curl = text[text.index("curl ") : text.index("'\n", text.index("curl "))] + "'"
    for _ in range(3):
        done = subprocess.run(
            shlex.split(curl.replace("\\\n", "")), capture_output=True, text=True, timeout=120
        )
        assert "Paris" in json.loads(done.stdout)["choices"][0]["message"]["content"]


def test_chat_cli_streams_and_resets(served, run_env) -> None:  # type: ignore[no-untyped-def]
    """With no --api-url: chat finds serve's API in serve's runtime file."""
    session = "What is the capital of France?\n!!reset\nWhat is the capital of France?\n!!exit\n"
    done = subprocess.run(
        [*tokenrelay_argv(), "chat", "--temperature", "0"],
        input=session,
        capture_output=True,
        text=True,
        timeout=120,
        env=run_env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Paris") == 2, done.stdout
    assert "conversation reset" in done.stderr


def test_the_readme_batch_example_runs_against_serve(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """README's Batch API example, as written, against serve's own batch worker."""
    url, _, _ = served
    section = README.read_text().split("### Batch API", 1)[1]
    (code,) = re.findall(r"^```python\n(.*?)^```", section, re.M | re.S)[:1]
    assert '"http://127.0.0.1:8000/v1"' in code
    script = tmp_path / "batch_example.py"
    script.write_text(code.replace("http://127.0.0.1:8000/v1", f"{url}/v1"))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, *answers = done.stdout.splitlines()
    assert first.startswith("completed") and "completed=2, failed=0, total=2" in first
    assert [a.split()[0] for a in answers] == ["question-0", "question-1"]


def test_a_killed_worker_is_started_again_and_loses_nothing(served) -> None:  # type: ignore[no-untyped-def]
    """Bug: serve stopped the API, the UI and Redis as soon as one worker died, so every
    client got a connection error. Now the worker is started again; its jobs, left pending
    by the dead one, are reclaimed once its heartbeat lapses, and every request is answered."""
    import concurrent.futures

    url, proc, log = served

    def ask(i: int) -> int:
        body = {"model": DEMO_MODEL, "prompt": f"Count to {i + 3}:", "max_tokens": 24}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=180).status_code

    worker = next(p for p in psutil.Process(proc.pid).children() if "worker" in p.cmdline())
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
    server = next(p for p in psutil.Process(proc.pid).children() if "redis-server" in p.name())
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


def test_status_finds_serves_redis_with_no_flags(served, run_env) -> None:  # type: ignore[no-untyped-def]
    """Bug (issue 10, item 3): `tokenrelay status` read redis://127.0.0.1:6379/0 and said
    "cannot read Redis"; serve's Redis is on a free port, named in serve's runtime file."""
    _, proc, log = served
    (path,) = Path(run_env["TOKENRELAY_RUNTIME_DIR"]).iterdir()
    info = json.loads(path.read_text())
    assert info["pid"] == proc.pid and info["model"] == DEMO_MODEL
    assert f"Redis: {info['redis_url']}" in log.read_text()
    done = subprocess.run(
        [*tokenrelay_argv(), "status"], capture_output=True, text=True, timeout=60, env=run_env
    )
    assert done.returncode == 0, done.stderr
    assert DEMO_MODEL in done.stdout and "1 workers" in done.stdout, done.stdout


def test_the_banners_worker_line_adds_a_worker(served, run_env) -> None:  # type: ignore[no-untyped-def]
    """The banner's `tokenrelay worker --redis-url ...` line, pasted, joins serve's Redis."""
    _, proc, log = served
    line = next(ln for ln in log.read_text().splitlines() if "tokenrelay worker" in ln)
    argv = shlex.split(line)
    assert argv[:4] == ["tokenrelay", "worker", "--redis-url", argv[3]]
    worker = subprocess.Popen(
        [*tokenrelay_argv(), *argv[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            status = subprocess.run(
                [*tokenrelay_argv(), "status", "--json"],
                capture_output=True, text=True, timeout=60, env=run_env,
            )  # fmt: skip
            models = json.loads(status.stdout)["models"]
            if models and models[0]["workers"] == 2:
                break
            assert worker.poll() is None and time.monotonic() < deadline, status.stdout
            time.sleep(1)
    finally:
        worker.terminate()
        worker.wait(60)


def test_ctrl_c_to_the_process_group_stops_everything_once(served, run_env) -> None:  # type: ignore[no-untyped-def]
    """Bug (issue 10, item 2): started in the background, serve inherited SIGINT ignored and
    relied on KeyboardInterrupt, so `kill -INT -- -PGID` stopped only its children, which
    it started again ("the API exited (code 0); starting it again.") and it kept running.
    Now the group's SIGINT stops everything once, with nothing started again, Redis last
    (item 10a: no worker warnings about an unreachable Redis), and the runtime file gone."""
    _, proc, log = served
    children = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in children)
    assert all(word in names for word in ("redis-server", "worker", "api", " ui ")), names
    before = log.read_text(errors="replace")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(90) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    after = log.read_text(errors="replace")[len(before) :]
    assert "starting it again" not in after, after
    assert "redis unreachable" not in after and "heartbeat failed" not in after, after
    assert after.count("Stopping ...") == 1, after
    assert not list(Path(run_env["TOKENRELAY_RUNTIME_DIR"]).iterdir())


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


def test_the_banners_chat_line_carries_the_api_key(stack: Stack) -> None:
    """Bug (issue 10, item 6): with `serve --api-keys`, the banner's curl line sent the key
    but its `tokenrelay chat` line did not, and pasted it got a 401. Each line, pasted
    against an API that wants the key, is answered."""
    stack.api("--api-keys", "k1,k2")
    stack.fake_worker()
    args = build_parser().parse_args(["serve", "--api-keys", "k1,k2"])
    info = runtime.ServeInfo(stack.redis_url, f"{stack.url}/v1", None, "fake", "/m/fake")
    text = banner(args, info)
    chat = next(ln for ln in text.splitlines() if "tokenrelay chat" in ln)
    assert shlex.split(chat)[-2:] == ["--api-key", "k1"]
    done = subprocess.run(
        [*tokenrelay_argv(), *shlex.split(chat)[1:]],
        input="hello\n!!exit\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "ASSISTANT: t0." in done.stdout, done.stdout + done.stderr
    curl = text[text.index("curl ") : text.index("'\n")].replace("\\\n", "") + "'"
    answer = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60)
    assert json.loads(answer.stdout)["choices"][0]["message"]["content"], answer.stdout
