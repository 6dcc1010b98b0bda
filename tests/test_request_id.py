"""X-Request-ID through the API's response, the Job and both processes' JSON logs."""

from __future__ import annotations

import json
import time

import httpx

from .stack import Process, Stack


def _json_lines(proc: Process) -> list[dict[str, object]]:
    lines = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _wait_for(proc: Process, request_id: str, timeout: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [r for r in _json_lines(proc) if r.get("request_id") == request_id]
        if hits:
            return hits
        time.sleep(0.1)
    raise AssertionError(f"no log line of {proc.name} with request_id {request_id}")


def test_client_request_id_flows_to_response_and_logs(stack: Stack) -> None:
    api = stack.api("--log-format", "json")
    worker = stack.fake_worker("--log-format", "json")
    for stream in (False, True):
        rid = f"client-id-{int(stream)}"
        r = httpx.post(
            f"{stack.url}/v1/completions",
            json={"model": "fake", "prompt": "hi", "max_tokens": 3, "stream": stream},
            headers={"X-Request-ID": rid},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == rid
        (done,) = [r for r in _wait_for(worker, rid) if "done" in str(r["message"])]
        assert done["command"] == "worker" and done["level"] == "info"
        access = _wait_for(api, rid)
        assert any("POST /v1/completions" in str(r["message"]) for r in access)
    # every line of both processes is JSON
    for proc in (api, worker):
        text = [ln for ln in proc.output().splitlines() if ln.strip()]
        assert text and all(ln.startswith("{") for ln in text), proc.output()[-2000:]


def test_request_id_defaults_to_the_completion_id(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"X-Request-ID": "bad id with spaces"},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == r.json()["id"]
    # requests that make no job get an id too; errors as well
    health = httpx.get(f"{stack.url}/health")
    assert health.headers["x-request-id"].startswith("req-")
    missing = httpx.post(f"{stack.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and missing.headers["x-request-id"].startswith("cmpl-")
