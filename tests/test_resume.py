"""Resumable streams: every SSE event has an id; a client whose connection broke calls
GET /v1/chat/completions/{id}/stream (or the completions twin) with Last-Event-ID and gets
the rest of the same run from the chunk log, while the job keeps running, never twice.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tokenrelay.queueing.keys import Keys
from tokenrelay.workers.fake_engine import fake_text

from .conftest import DEMO_MODEL
from .openai_errors import assert_error
from .resume_helpers import HANG_GUARD_S, read_events, resume, resumed, stream
from .stack import Stack

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
FAKE = "fake"
QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def chat(model: str, max_tokens: int, **extra: object) -> dict[str, object]:
    return {"model": model, "stream": True, "max_tokens": max_tokens, "messages": QUESTION, **extra}


def runs_of(worker_output: str, rid: str) -> int:
    """How many times the worker ran job ``rid`` to its end."""
    return worker_output.count(f"job {rid} done")


def wait_for(predicate: object, what: str) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_real_model_resumed_mid_stream_equals_an_unbroken_run(
    model_stack: Stack, sync_redis: redis.Redis
) -> None:
    body = chat(DEMO_MODEL, 48, seed=1234, temperature=0.9, ignore_eos=True)
    with httpx.Client(base_url=model_stack.url, timeout=HANG_GUARD_S) as client:
        whole = stream(client, CHAT, body)
        assert whole.done
        cut = stream(client, CHAT, body, cut_after=3)
        assert not cut.done
        rid = cut.completion_id
        rest = resumed(client, CHAT, rid, cut.last_id)
        assert rest.done
        assert cut.text() + rest.text() == whole.text()
        # ids go on where the cut stream stopped, and every event has one
        assert all(e.id for e in cut.events + rest.events)
        assert rest.events[0].id != cut.last_id

        # after the end, while the log lives, the same tail again; no header: the whole
        again = resumed(client, CHAT, rid, cut.last_id)
        assert [e.data for e in again.events] == [e.data for e in rest.events]
        full = resumed(client, CHAT, rid, None)
        assert full.text() == whole.text()
    worker = next(p for p in model_stack.processes if p.name == "worker")
    wait_for(lambda: runs_of(worker.output(), rid) >= 1, "the job's end in the worker log")
    assert runs_of(worker.output(), rid) == 1
    assert f"job {rid} re-delivered" not in worker.output()


def test_a_resume_follows_a_job_still_running(stack: Stack, sync_redis: redis.Redis) -> None:
    """Cut, resumed, cut again, resumed again: one run, text whole, never cancelled, though
    the job runs well past the grace (5 s; 10 s of tokens)."""
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", "5")
    worker = stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        body = {"model": FAKE, "stream": True, "max_tokens": 200, "prompt": "go"}
        cut = stream(client, COMPLETIONS, body, cut_after=5)
        rid = cut.completion_id
        path = f"{COMPLETIONS}/{rid}/stream"
        with client.stream("GET", path, headers={"Last-Event-ID": cut.last_id}) as r:
            assert r.status_code == 200
            again = read_events(r, cut_after=5)
        assert not again.done
        rest = resumed(client, COMPLETIONS, rid, again.last_id)
        assert rest.done
        assert cut.text() + again.text() + rest.text() == fake_text(rid, 200)
        assert not sync_redis.exists(keys.cancel(FAKE, rid))
        assert sync_redis.exists(keys.result(FAKE, rid))
    assert runs_of(worker.output(), rid) == 1


def test_resume_ids_belong_to_the_key_that_started_them(stack: Stack) -> None:
    stack.api("--api-keys", "key-a,key-b")
    stack.fake_worker()
    body = {"model": FAKE, "stream": True, "max_tokens": 8, "prompt": "go"}
    a = httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S, headers=_bearer("key-a"))
    b = httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S, headers=_bearer("key-b"))
    with a, b:
        whole = stream(a, COMPLETIONS, body)
        rid = whole.completion_id
        assert_error(resume(b, COMPLETIONS, rid, "0.0"), 404, "stream_not_found")  # type: ignore[arg-type]
        nobody = httpx.get(f"{stack.url}{COMPLETIONS}/{rid}/stream")
        assert_error(nobody, 401, "invalid_api_key")
        assert resumed(a, COMPLETIONS, rid, None).text() == whole.text()


def test_unknown_expired_and_cancelled_streams_are_404(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", "0.5")
    stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        unknown = "chatcmpl-" + "0" * 32
        assert_error(resume(client, CHAT, unknown, None), 404, "stream_not_found")  # type: ignore[arg-type]
        assert_error(resume(client, CHAT, "nonsense", None), 404, "stream_not_found")  # type: ignore[arg-type]

        done = stream(client, COMPLETIONS, {"model": FAKE, "stream": True, "prompt": "x"})
        rid = done.completion_id
        # a completion's id is not a chat stream's
        assert_error(resume(client, CHAT, rid, None), 404, "stream_not_found")  # type: ignore[arg-type]
        bad = resume(client, COMPLETIONS, rid, "yesterday")
        assert_error(bad, 400, "invalid_value")  # type: ignore[arg-type]
        # the log lapsed (as its TTL does): gone, and said so
        sync_redis.delete(keys.chunk_log(FAKE, rid))
        assert_error(resume(client, COMPLETIONS, rid, None), 404, "stream_expired")  # type: ignore[arg-type]

        # nobody came back within the grace: the job was cancelled and cannot be resumed
        cut = stream(client, CHAT, chat(FAKE, 400), cut_after=3)
        rid = cut.completion_id
        wait_for(lambda: sync_redis.exists(keys.cancel(FAKE, rid)), "the cancel after the grace")
        gone = resume(client, CHAT, rid, cut.last_id)
        assert_error(gone, 404, "stream_cancelled")  # type: ignore[arg-type]


def test_no_grace_cancels_at_once_and_keeps_no_record(
    stack: Stack, sync_redis: redis.Redis
) -> None:
    keys = Keys(stack.prefix)
    stack.api("--resume-grace", "0")
    stack.fake_worker("--fake-token-delay", "0.05")
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        cut = stream(client, CHAT, chat(FAKE, 400), cut_after=3)
        rid = cut.completion_id
        wait_for(lambda: sync_redis.exists(keys.cancel(FAKE, rid)), "the cancel")
        assert not sync_redis.exists(keys.resume(FAKE, rid))
        assert_error(resume(client, CHAT, rid, cut.last_id), 404, "stream_not_found")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_the_openai_client_reads_streams_with_ids(stack: Stack, kind: str) -> None:
    stack.api()
    stack.fake_worker()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    if kind == "chat":
        chunks = list(
            client.chat.completions.create(model=FAKE, messages=QUESTION, max_tokens=6, stream=True)
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(model=FAKE, prompt="go", max_tokens=6, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == fake_text(chunks[0].id, 6)
    with httpx.Client(base_url=stack.url, timeout=HANG_GUARD_S) as http:
        path = CHAT if kind == "chat" else COMPLETIONS
        assert resumed(http, path, chunks[0].id, None).text() == text


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_readme_example_runs_as_written(model_stack: Stack) -> None:
    """README's Resumable streams example, against this stack instead of port 8000: what
    it prints (cut after 40 characters, then resumed) is an unbroken run's text."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Resumable streams", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000", model_stack.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        scope: dict[str, object] = {}
        exec(compile(source, "README.md", "exec"), scope)
    with httpx.Client(base_url=model_stack.url, timeout=HANG_GUARD_S) as client:
        whole = stream(client, CHAT, scope["body"])  # type: ignore[arg-type]
    assert len(whole.text()) > 40  # the example did cut its stream
    assert out.getvalue() == whole.text() + "\n"
