"""POST /v1/chat/completions/{id}/cancel and /v1/completions/{id}/cancel: a started stream
stopped at once, not a resume grace after its client left (api/stream_cancel.py).

The APIs here run with a resume grace of 30 s, so a cancel seen within HANG_GUARD_S of the
call can only be the endpoint's (that guard is a hang guard, no claim on speed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import redis

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.queueing.keys import Keys

from .conftest import DEMO_MODEL
from .openai_errors import assert_error
from .resume_helpers import Event as SseEvent
from .resume_helpers import has_content, resume, resumed, stream
from .stack import Stack

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FAKE = "fake"
GRACE = "30"
HANG_GUARD_S = 20.0  # under the grace: what stops a job by then is the cancel, not the grace
QUESTION = [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]


def chat(model: str, max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": model, "stream": True, "max_tokens": max_tokens, "messages": QUESTION, **extra}


def sse(lines: Iterator[str]) -> Iterator[SseEvent | None]:
    """A stream's events in order; None for [DONE]."""
    event_id, data = None, []
    for line in lines:
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            text, data = "\n".join(data), []
            yield None if text == "[DONE]" else SseEvent(event_id, text)


def wait_for(predicate: Callable[[], Any], what: str, within: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def cancel(client: httpx.Client, path: str, rid: str) -> httpx.Response:
    return client.post(f"{path}/{rid}/cancel")


def cancel_while_following(
    client: httpx.Client, path: str, body: dict[str, object], after: int = 3
) -> tuple[str, httpx.Response, list[SseEvent], bool]:
    """Stream ``body``; after ``after`` events with text, cancel it on another connection
    and read the stream on to its end: (id, the cancel's answer, events after it, [DONE])."""
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse(r.iter_lines())
        seen: list[SseEvent] = []
        for event in events:
            assert event is not None, "the stream ended before the cancel"
            seen.append(event)
            if sum(map(has_content, seen)) >= after:
                break
        rid = str(seen[0].body["id"])
        answer = cancel(client, path, rid)
        rest = list(events)
    return rid, answer, [e for e in rest if e is not None], bool(rest) and rest[-1] is None


def worker_inflight(client: redis.Redis, prefix: str) -> int:
    ids = client.smembers(f"{prefix}:workers")
    infos = [client.get(f"{prefix}:worker:{i}") for i in ids]
    return sum(json.loads(info)["inflight"] for info in infos if info)


def test_cancel_ends_a_followed_stream_at_once(stack: Stack, sync_redis: redis.Redis) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", GRACE)
    worker = stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        rid, answer, rest, done = cancel_while_following(client, CHAT, chat(FAKE, 2000))
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "id": rid,
            "object": "chat.completion.cancel",
            "cancelled": True,
            "status": "cancelled",
        }
        # the follower gets the cancelled error event, then [DONE]: the usual cancelled end
        assert done
        assert rest[-1].body["error"]["code"] == "cancelled"
        assert sync_redis.exists(keys.cancel(FAKE, rid))
        wait_for(lambda: worker_inflight(sync_redis, stack.prefix) == 0, "the worker's slot")
        assert f"job {rid} cancelled by its client" in worker.output()
        assert f"job {rid} done" not in worker.output()

        # idempotent: the same answer again; a resume is told it was cancelled
        again = cancel(client, CHAT, rid)
        assert again.status_code == 200 and again.json() == answer.json()
        assert_error(resume(client, CHAT, rid, None), 404, "stream_cancelled")  # type: ignore[arg-type]


def test_cancel_after_a_hang_up_does_not_wait_for_the_grace(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", GRACE)
    stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        body = {"model": FAKE, "stream": True, "max_tokens": 2000, "prompt": "go"}
        cut = stream(client, COMPLETIONS, body, cut_after=3)
        rid = cut.completion_id
        assert not sync_redis.exists(keys.cancel(FAKE, rid))  # the grace runs
        answer = cancel(client, COMPLETIONS, rid)
        assert answer.status_code == 200, answer.text
        assert answer.json()["object"] == "text_completion.cancel"
        assert answer.json()["cancelled"] is True
        assert sync_redis.exists(keys.cancel(FAKE, rid))
        wait_for(lambda: worker_inflight(sync_redis, stack.prefix) == 0, "the worker's slot")


def test_a_finished_stream_answers_completed_and_stays_resumable(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", GRACE)
    stack.fake_worker()
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        whole = stream(client, CHAT, chat(FAKE, 8))
        assert whole.done
        rid = whole.completion_id
        answer = cancel(client, CHAT, rid)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "id": rid,
            "object": "chat.completion.cancel",
            "cancelled": False,
            "status": "completed",
        }
        assert not sync_redis.exists(keys.cancel(FAKE, rid))
        assert resumed(client, CHAT, rid, None).text() == whole.text()


def test_unknown_foreign_and_expired_ids_are_404(stack: Stack, sync_redis: redis.Redis) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", GRACE, "--api-keys", "key-a,key-b")
    stack.fake_worker()
    a = httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S, headers=_bearer("key-a"))
    b = httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S, headers=_bearer("key-b"))
    with a, b:
        assert_error(cancel(a, CHAT, "chatcmpl-" + "0" * 32), 404, "stream_not_found")
        assert_error(cancel(a, CHAT, "nonsense"), 404, "stream_not_found")
        assert_error(cancel(a, CHAT, "x" * 5000), 404, "stream_not_found")
        whole = stream(a, COMPLETIONS, {"model": FAKE, "stream": True, "prompt": "x"})
        rid = whole.completion_id
        assert_error(cancel(a, CHAT, rid), 404, "stream_not_found")  # not a chat stream
        # another key's stream: the very 404 an unknown id gets, but for the id
        foreign = assert_error(cancel(b, COMPLETIONS, rid), 404, "stream_not_found")
        nobody = "cmpl-" + "0" * 32
        unknown = assert_error(cancel(b, COMPLETIONS, nobody), 404)
        assert foreign["message"].replace(rid, nobody) == unknown["message"]
        assert_error(httpx.post(f"{stack.url}{COMPLETIONS}/{rid}/cancel"), 401, "invalid_api_key")
        sync_redis.delete(keys.chunk_log(FAKE, rid))  # the log lapsed, as its TTL does
        assert_error(cancel(a, COMPLETIONS, rid), 404, "stream_expired")


def test_the_real_model_stops_generating_on_cancel(
    model_stack: Stack, sync_redis: redis.Redis
) -> None:
    log_key = Keys(model_stack.prefix).chunk_log
    body = chat(DEMO_MODEL, 4000, ignore_eos=True, temperature=0.9)
    with httpx.Client(base_url=model_stack.url, timeout=HANG_GUARD_S) as client:
        rid, answer, rest, done = cancel_while_following(client, CHAT, body)
    assert answer.status_code == 200 and answer.json()["cancelled"] is True
    assert done and rest[-1].body["error"]["code"] == "cancelled"

    def stopped() -> bool:  # the chunk log no longer grows (the worker batches ~20-50 ms)
        before = sync_redis.xlen(log_key(DEMO_MODEL, rid))
        time.sleep(1.0)
        return sync_redis.xlen(log_key(DEMO_MODEL, rid)) == before

    wait_for(stopped, "the worker to stop generating")
    worker = next(p for p in model_stack.processes if p.name == "worker")
    wait_for(lambda: f"job {rid} cancelled by its client" in worker.output(), "the worker log")
    assert f"job {rid} done" not in worker.output()


def test_chat_cli_ctrl_c_cancels_the_job(stack: Stack, sync_redis: redis.Redis) -> None:
    """`tokenrelay chat`: Ctrl-C during a reply stops it, and its job is cancelled on the
    API at once, not after the 30 s grace."""
    stack.api("--resume-grace", GRACE)
    stack.fake_worker("--fake-token-delay", "0.05")
    pattern = Keys(stack.prefix).cancel(FAKE, "*")

    def cancel_keys() -> list[str]:
        return list(sync_redis.scan_iter(pattern))

    argv = [*tokenrelay_argv(), "chat", "--api-url", f"{stack.url}/v1", "--max-tokens", "2000"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    guard = threading.Timer(60, proc.kill)  # only against a hang
    guard.start()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"tell me a long story\n")
        out = b""
        while b"t5." not in out:  # the reply streams: the job is running
            piece = os.read(proc.stdout.fileno(), 4096)
            assert piece, out
            out += piece
        assert not cancel_keys()  # a grace of 30 s: only the CLI's cancel sets it soon
        proc.send_signal(signal.SIGINT)
        wait_for(cancel_keys, "the job's cancel key")
        wait_for(lambda: worker_inflight(sync_redis, stack.prefix) == 0, "the worker's slot")
        proc.stdin.write(b"!!exit\n")
        rest, _ = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0
        assert b"[stopped]" in out + rest
    finally:
        guard.cancel()
        proc.kill()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
