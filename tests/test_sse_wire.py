"""The server-sent-events wire format, byte by byte, as OpenAI clients parse it.

Every event is ``id: SEQ.K\\ndata: <json>\\n\\n`` (the id, for a resume with Last-Event-ID,
rises from event to event; ``[DONE]`` has none); a chat stream opens each choice with a role delta,
then content deltas, then one finish chunk per choice, then (if asked) a usage chunk with
no choices, then ``data: [DONE]``. The fake engine makes the content checkable exactly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis
from tokenrelay.workers.fake_engine import DEFAULT_MAX_TOKENS, fake_text

from .conftest import DEMO_MODEL
from .stack import Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HELLO = [{"role": "user", "content": "say three words"}]


@pytest.fixture(scope="module")
def fake_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    """One API and one fake worker for the whole module (they only answer requests)."""
    s = Stack(redis_server.url, f"sse{uuid.uuid4().hex[:8]}")
    s.api()
    s.fake_worker()
    yield s
    s.stop()


def _raw_stream(url: str, path: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        raw = r.read()
    return r, raw


def _events(raw: bytes) -> list[Any]:
    """Split a body into events, checking the framing of each; ``[DONE]`` must be last."""
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", "the body must end with a blank line"
    events: list[Any] = []
    ids: list[tuple[int, int]] = []
    for part in parts[:-1]:
        if part.startswith(b"id: "):
            line, _, part = part.partition(b"\n")
            seq, k = line.removeprefix(b"id: ").split(b".")
            ids.append((int(seq), int(k)))
        assert part.startswith(b"data: "), part
        assert b"\n" not in part and b"\r" not in part, part
        payload = part[len(b"data: ") :]
        if payload == b"[DONE]":
            events.append("[DONE]")
        else:
            events.append(json.loads(payload))
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert len(ids) == len(events) - 1 and ids == sorted(set(ids)), ids
    return events[:-1]


def _check_envelope(chunks: list[dict[str, Any]], obj: str, model: str) -> None:
    first = chunks[0]
    assert first["id"]
    assert isinstance(first["created"], int)
    for c in chunks:
        assert c["object"] == obj
        assert c["id"] == first["id"]
        assert c["created"] == first["created"]
        assert c["model"] == model
        assert isinstance(c["choices"], list)


def _chat_stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    r, raw = _raw_stream(url, "/v1/chat/completions", {**body, "stream": True})
    assert r.status_code == 200, raw
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(raw)
    _check_envelope(chunks, "chat.completion.chunk", body["model"])
    return chunks


def _check_chat_sequence(chunks: list[dict[str, Any]], n: int, usage: bool) -> list[str]:
    """Role first (per choice), then content, then one finish per choice, then usage.
    Returns the content of each choice."""
    if usage:
        *chunks, last = chunks
        assert last["choices"] == []
        u = last["usage"]
        assert set(u) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    for c in chunks:
        assert len(c["choices"]) == 1, c
        assert c.get("usage") is None, c
    opened: set[int] = set()
    finished: set[int] = set()
    texts = [""] * n
    for c in chunks:
        choice = c["choices"][0]
        i = choice["index"]
        assert 0 <= i < n
        delta = choice["delta"]
        if i not in opened:
            assert delta == {"role": "assistant", "content": ""}, c
            assert choice["finish_reason"] is None
            opened.add(i)
            continue
        assert i not in finished, f"chunk after the finish of choice {i}: {c}"
        assert "role" not in delta
        if choice["finish_reason"] is not None:
            assert choice["finish_reason"] in ("stop", "length")
            finished.add(i)
        texts[i] += delta.get("content") or ""
    assert opened == finished == set(range(n))
    return texts


# the fake engine: exact content


def test_fake_chat_stream_wire(fake_stack: Stack) -> None:
    chunks = _chat_stream(
        fake_stack.url,
        {"model": "fake", "messages": HELLO, "stream_options": {"include_usage": True}},
    )
    request_id = chunks[0]["id"]
    assert request_id.startswith("chatcmpl-")
    # role, at least one content delta, finish, usage
    assert len(chunks) >= 4
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    (text,) = _check_chat_sequence(chunks, n=1, usage=True)
    assert text == fake_text(request_id, DEFAULT_MAX_TOKENS)
    assert chunks[-1]["usage"] == {
        "prompt_tokens": len(HELLO[0]["content"].split()),
        "completion_tokens": DEFAULT_MAX_TOKENS,
        "total_tokens": len(HELLO[0]["content"].split()) + DEFAULT_MAX_TOKENS,
    }
    # with include_usage, every chunk carries the key ("usage": null before the last)
    assert all("usage" in c for c in chunks)


def test_fake_chat_stream_without_usage(fake_stack: Stack) -> None:
    chunks = _chat_stream(fake_stack.url, {"model": "fake", "messages": HELLO, "max_tokens": 5})
    (text,) = _check_chat_sequence(chunks, n=1, usage=False)
    assert text == fake_text(chunks[0]["id"], 5)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_fake_chat_stream_two_choices(fake_stack: Stack) -> None:
    chunks = _chat_stream(
        fake_stack.url,
        {
            "model": "fake",
            "messages": HELLO,
            "n": 2,
            "max_tokens": 6,
            "stream_options": {"include_usage": True},
        },
    )
    request_id = chunks[0]["id"]
    # both choices open before any content
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    texts = _check_chat_sequence(chunks, n=2, usage=True)
    assert texts == [fake_text(request_id, 6, 0), fake_text(request_id, 6, 1)]
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_fake_completion_stream_wire(fake_stack: Stack) -> None:
    r, raw = _raw_stream(
        fake_stack.url,
        "/v1/completions",
        {
            "model": "fake",
            "prompt": "one two three",
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200, raw
    chunks = _events(raw)
    _check_envelope(chunks, "text_completion", "fake")
    request_id = chunks[0]["id"]
    assert request_id.startswith("cmpl-")
    *body, last = chunks
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    for c in body:
        (choice,) = c["choices"]
        assert choice["index"] == 0
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert "".join(c["choices"][0]["text"] for c in body) == fake_text(request_id, 7)
    finishes = [c["choices"][0]["finish_reason"] for c in body]
    assert finishes[-1] == "length"
    assert finishes.count("length") == 1


def test_fake_non_streaming_matches(fake_stack: Stack) -> None:
    r = httpx.post(
        f"{fake_stack.url}/v1/chat/completions",
        json={"model": "fake", "messages": HELLO},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": fake_text(body["id"], DEFAULT_MAX_TOKENS),
    }
    assert body["choices"][0]["finish_reason"] == "length"


# the real model


def test_model_chat_stream_wire(model_stack: Stack) -> None:
    chunks = _chat_stream(
        model_stack.url,
        {
            "model": DEMO_MODEL,
            "messages": QUESTION,
            "temperature": 0,
            "max_tokens": 48,
            "stream_options": {"include_usage": True},
        },
    )
    assert chunks[0]["id"].startswith("chatcmpl-")
    (text,) = _check_chat_sequence(chunks, n=1, usage=True)
    assert "Paris" in text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
