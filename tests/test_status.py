"""GET /v1/status (the UI's status tab reads it) and `tokenrelay status`, against real
processes."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx

from tokenrelay.commands import tokenrelay_argv

from .stack import Stack

MODEL_FIELDS = {"name", "workers", "queued", "running", "tokens_per_s", "dead_letters"}
WORKER_FIELDS = {
    "id", "models", "device", "capacity", "inflight", "engine", "host", "pid",
    "started_at", "last_heartbeat", "tokens_per_s", "version",
}  # fmt: skip


def _status(stack: Stack, **kw: object) -> httpx.Response:
    return httpx.get(f"{stack.url}/v1/status", timeout=10, **kw)  # type: ignore[arg-type]


def _fake(model: str) -> dict[str, object]:
    return {"model": model, "prompt": "hi", "max_tokens": 40, "stream": False}


def test_status_reports_models_and_workers(stack: Stack) -> None:
    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "3", "--fake-token-delay", "0.02")
    r = _status(stack)
    assert r.status_code == 200, r.text
    body = r.json()
    (model,) = body["models"]
    assert MODEL_FIELDS <= set(model)
    assert model == model | {"name": "fake", "workers": 1, "queued": 0, "running": 0}
    (worker,) = body["workers"]
    assert WORKER_FIELDS <= set(worker)
    assert worker["models"] == ["fake"] and worker["capacity"] == 3
    assert worker["engine"] == "fake" and worker["device"] == "cpu"
    assert abs(worker["last_heartbeat"] - time.time()) < 10


def test_status_counts_queued_running_and_tokens_per_s(stack: Stack) -> None:
    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "2", "--fake-token-delay", "0.05")
    with httpx.Client(timeout=60) as client:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(5) as pool:
            futures = [
                pool.submit(client.post, f"{stack.url}/v1/completions", json=_fake("fake"))
                for _ in range(5)
            ]
            seen = _poll(stack, lambda m, _: m["running"] == 2 and m["queued"] == 3)
            busy = _poll(stack, lambda m, w: w[0]["tokens_per_s"] > 0 and m["tokens_per_s"] > 0)
            for f in futures:
                assert f.result().status_code == 200
    assert seen and busy
    idle = _poll(stack, lambda m, _: m["running"] == 0 and m["queued"] == 0)
    assert idle


def _poll(stack: Stack, ok: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = _status(stack).json()
        if body["models"] and ok(body["models"][0], body["workers"]):  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_status_needs_the_api_key(stack: Stack) -> None:
    stack.api("--api-keys", "k1")
    stack.fake_worker()
    assert _status(stack).status_code == 401
    ok = _status(stack, headers={"Authorization": "Bearer k1"})
    assert ok.status_code == 200 and ok.json()["models"][0]["name"] == "fake"


def test_status_counts_dead_letters(stack: Stack, sync_redis) -> None:  # type: ignore[no-untyped-def]
    stack.api()
    stack.fake_worker()
    sync_redis.xadd(f"{stack.prefix}:{{m:fake}}:dead", {"job": "{}", "reason": "test"})
    (model,) = _status(stack).json()["models"]
    assert model["dead_letters"] == 1


# `tokenrelay status`


def _cli(stack: Stack, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tokenrelay_argv(), "status", "--redis-url", stack.redis_url,
         "--key-prefix", stack.prefix, *argv],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_status_command_prints_tables(stack: Stack, sync_redis) -> None:  # type: ignore[no-untyped-def]
    stack.fake_worker("--limit-worker-concurrency", "5")
    sync_redis.xadd(f"{stack.prefix}:{{m:fake}}:dead", {"job": "{}", "reason": "test"})
    out = _cli(stack)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "WORKERS", "QUEUED", "RUNNING", "BATCH-QUEUED",
                                "BATCH-RUNNING", "OLDEST", "TOKENS/S", "DEAD"]  # fmt: skip
    assert lines[1].split() == ["fake", "1", "0", "0", "0", "0", "0.0s", "0.0", "1"]
    worker = next(ln for ln in lines if ln.startswith("w-")).split()
    assert worker[1:6] == ["fake", "cpu", "fake", "-", "0/5"]  # a fake engine has no weights
    assert "1 workers, 0 queued, 0 running; batch lines: 0 queued, 0 running" in out.stdout

    as_json = json.loads(_cli(stack, "--json").stdout)
    assert as_json["models"][0]["dead_letters"] == 1 and len(as_json["workers"]) == 1


def test_status_command_watch_redraws(stack: Stack) -> None:
    stack.fake_worker()
    proc = subprocess.Popen(
        [*tokenrelay_argv(), "status", "--redis-url", stack.redis_url,
         "--key-prefix", stack.prefix, "--watch", "0.3"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Read as it draws and stop after two frames (not after a sleep of 4 s, within which a
    # loaded machine had not even started the command); 60 s guards only a hang.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "".join(lines).count("\x1b[H\x1b[2J") < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=60)
    out = "".join(lines)
    assert proc.returncode == 0
    assert out.count("\x1b[H\x1b[2J") >= 2 and out.count("MODEL") >= 2


def test_status_command_without_redis_says_so() -> None:
    out = subprocess.run(
        [*tokenrelay_argv(), "status", "--redis-url", "redis://127.0.0.1:1/0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0 and "cannot read Redis at redis://127.0.0.1:1/0" in out.stderr


def test_status_watch_into_a_closed_pipe_exits_quietly(stack: Stack) -> None:
    """Bug (issue 10, item 10c): `tokenrelay status --watch 1 | head` ended in a
    BrokenPipeError traceback once head had its lines and left."""
    stack.fake_worker()
    proc = subprocess.Popen(
        [*tokenrelay_argv(), "status", "--redis-url", stack.redis_url,
         "--key-prefix", stack.prefix, "--watch", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert "MODEL" in "".join(proc.stdout.readline() for _ in range(3))
    proc.stdout.close()  # what head does once it has its lines
    assert proc.wait(30) == 128 + signal.SIGPIPE  # a shell's code for a closed pipe
    assert proc.stderr.read() == ""
