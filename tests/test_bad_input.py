"""Bad requests and unavailable capacity: the right status, and errors in the OpenAI shape.

Every error body is ``{"error": {"message", "type", "param", "code"}}``; the official client
must turn each status into its matching exception class.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis

from .conftest import DEMO_MODEL
from .openai_errors import assert_error
from .stack import Stack

HELLO = [{"role": "user", "content": "hello there"}]
CHAT = {"model": "fake", "messages": HELLO, "max_tokens": 4}
COMPLETION = {"model": "fake", "prompt": "hello there", "max_tokens": 4}


@pytest.fixture(scope="module")
def fake_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    """One API and one fake worker (max context 4096) shared by the request-shape tests."""
    s = Stack(redis_server.url, f"bad{uuid.uuid4().hex[:8]}")
    s.api()
    s.fake_worker()
    yield s
    s.stop()


def _client(stack: Stack, api_key: str = "EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def _post(stack: Stack, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", timeout=60, **kw)


def _stream_status(stack: Stack, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST a streaming request; the status must be decided before any event is sent."""
    with httpx.stream("POST", f"{stack.url}{path}", json=body, timeout=60) as r:
        r.read()
    return r


# request validation: 400, never FastAPI's 422


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": "hi"}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"model": ""}, "model"),
        ({"stream": "yes please"}, "stream"),
    ],
)
def test_chat_invalid_values(fake_stack: Stack, change: dict[str, Any], param: str) -> None:
    for stream in (False, True):
        body = {**CHAT, "stream": stream, **change}
        err = assert_error(_post(fake_stack, "/v1/chat/completions", json=body), 400)
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param, err
        assert err["code"] == "invalid_value"


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_chat_missing_field(fake_stack: Stack, missing: str) -> None:
    body = {k: v for k, v in CHAT.items() if k != missing}
    err = assert_error(_post(fake_stack, "/v1/chat/completions", json=body), 400)
    assert err["param"] == missing


@pytest.mark.parametrize(
    "change",
    [{"prompt": None}, {"prompt": []}, {"temperature": 3}, {"n": 0}, {"top_p": 0}],
)
def test_completion_invalid_values(fake_stack: Stack, change: dict[str, Any]) -> None:
    body = {**COMPLETION, **change}
    assert_error(_post(fake_stack, "/v1/completions", json=body), 400, "invalid_value")


@pytest.mark.parametrize(
    ("path", "base", "change", "param"),
    [
        ("/v1/completions", COMPLETION, {"logprobs": 6}, "logprobs"),
        ("/v1/completions", COMPLETION, {"logprobs": -1}, "logprobs"),
        ("/v1/completions", COMPLETION, {"logprobs": True}, "logprobs"),
        ("/v1/completions", COMPLETION, {"max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", CHAT, {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", CHAT, {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", CHAT, {"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_logprobs_values(
    fake_stack: Stack, path: str, base: dict[str, Any], change: dict[str, Any], param: str
) -> None:
    """Out of OpenAI's ranges (chat top_logprobs 0-20 and only with logprobs=true,
    completions' logprobs an integer 0-5, max_tokens 0 only with echo): a 400 naming the
    field, streamed or not."""
    for stream in (False, True):
        body = {**base, "stream": stream, **change}
        err = assert_error(_stream_status(fake_stack, path, body), 400, "invalid_value")
        assert err["param"] == param, err
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "base", "change"),
    [
        ("/v1/completions", COMPLETION, {"echo": False}),
        ("/v1/completions", COMPLETION, {"logprobs": None}),
        ("/v1/completions", COMPLETION, {"logprobs": False}),
        ("/v1/chat/completions", CHAT, {"logprobs": False}),
        ("/v1/chat/completions", CHAT, {"logprobs": None, "top_logprobs": None}),
        ("/v1/chat/completions", CHAT, {"logprobs": False, "top_logprobs": 0}),
        ("/v1/chat/completions", CHAT, {"stream": False, "stream_options": None}),
    ],
)
def test_unsupported_fields_at_their_default_are_accepted(
    fake_stack: Stack, path: str, base: dict[str, Any], change: dict[str, Any]
) -> None:
    r = _post(fake_stack, path, json={**base, **change})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("path", "base"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_stream_options_without_stream(fake_stack: Stack, path: str, base: dict[str, Any]) -> None:
    """Bug: stream_options was accepted on a non-streaming request; OpenAI answers 400."""
    for extra in ({}, {"stream": False}):
        body = {**base, **extra, "stream_options": {"include_usage": True}}
        err = assert_error(_post(fake_stack, path, json=body), 400, "invalid_value")
        assert err["param"] == "stream_options", err
        assert "stream" in err["message"]
    r = _stream_status(
        fake_stack, path, {**base, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200, r.text
    with pytest.raises(openai.BadRequestError) as exc:
        _client(fake_stack).chat.completions.create(
            model="fake", messages=HELLO, stream_options={"include_usage": True}
        )
    assert exc.value.param == "stream_options"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_json(fake_stack: Stack, path: str) -> None:
    for raw in (b'{"model": "fake", "messages": [', b"{bad json}", b"\xff\xfe"):
        r = _post(fake_stack, path, content=raw, headers={"content-type": "application/json"})
        assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_missing_body(fake_stack: Stack, path: str) -> None:
    assert_error(_post(fake_stack, path), 400, "invalid_body")
    r = _post(fake_stack, path, content=b"", headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_body_not_an_object(fake_stack: Stack) -> None:
    for body in ([], "hello", 3, None):
        assert_error(_post(fake_stack, "/v1/chat/completions", json=body), 400)
    for body, kind in (([], "an array"), ("hello", "a string"), (3, "a number")):
        r = _post(fake_stack, "/v1/chat/completions", json=body)
        err = assert_error(r, 400, "invalid_body")
        assert err["message"] == f"The request body must be a JSON object, not {kind}.", err


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ({"content-type": "application/x-www-form-urlencoded"}, "'application/x-www-form"),
        ({"content-type": "text/plain"}, "'text/plain'"),
        ({}, "no Content-Type header"),
    ],
)
def test_json_body_without_json_content_type(
    fake_stack: Stack, headers: dict[str, str], said: str
) -> None:
    """Bug: a JSON body sent as a form (curl -d without -H) or with no Content-Type got
    "Input should be a valid dictionary or object to extract fields from". Now the error
    names the content type."""
    raw = json.dumps(CHAT).encode()
    r = _post(fake_stack, "/v1/chat/completions", content=raw, headers=headers)
    err = assert_error(r, 400, "invalid_body")
    assert "Content-Type: application/json" in err["message"], err
    assert said in err["message"], err
    assert err["param"] is None
    ok = {"content-type": "application/json; charset=utf-8"}
    assert _post(fake_stack, "/v1/chat/completions", content=raw, headers=ok).status_code == 200


# param names: the field in OpenAI's style, never a pydantic union member (".str",
# ".list[...]", "function-after[...]")


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
CMPL, CHAT_PATH = "/v1/completions", "/v1/chat/completions"


def _content(*parts: object, before: int = 0) -> dict[str, Any]:
    """A chat change whose message number ``before`` holds these content parts."""
    return {"messages": [*HELLO * before, {"role": "user", "content": list(parts)}]}


@pytest.mark.parametrize(
    ("path", "change", "code", "param", "said"),
    [
        (CMPL, {"prompt": ["a", "b"]}, "unsupported_value", "prompt", "list of 2 prompts"),
        (CMPL, {"prompt": [1, 2]}, "unsupported_value", "prompt", "token ids is not supported"),
        (CMPL, {"prompt": [[1, 2]]}, "unsupported_value", "prompt", "token ids is not supported"),
        (CMPL, {"prompt": []}, "invalid_value", "prompt", "must not be an empty list"),
        (CMPL, {"prompt": 3}, "invalid_value", "prompt", "a valid string or a valid list"),
        (CHAT_PATH, {"stop": 5}, "invalid_value", "stop", "a valid string or a valid list"),
        (CHAT_PATH, {"stop": ["a"] * 5}, "invalid_value", "stop", "at most 4"),
        (
            CHAT_PATH,
            {"messages": [{"role": "user", "content": {"a": 1}}]},
            "invalid_value",
            "messages[0].content",
            "a valid string or a valid list",
        ),
        (
            CHAT_PATH,
            _content({"type": "text"}),
            "invalid_value",
            "messages[0].content[0].text",
            "Field required",
        ),
        (
            CHAT_PATH,
            _content({"type": "text", "text": "What is this?"}, IMAGE, before=1),
            "unsupported_value",
            "messages[1].content",
            "image content parts are not supported by this text model",
        ),
        (
            CHAT_PATH,
            _content({"type": "input_audio", "input_audio": {}}),
            "unsupported_value",
            "messages[0].content",
            "audio content parts are not supported by this text model",
        ),
    ],
)
def test_params_name_the_field_not_a_union_member(
    fake_stack: Stack, path: str, change: dict[str, Any], code: str, param: str, said: str
) -> None:
    """Bug: prompt ["a", "b"] answered "Input should be a valid string ('prompt.str')" with
    param prompt.str, and an image_url part param messages.0.content.str: pydantic's error
    for the first member of a union, not for the field and what is wrong with it."""
    base = COMPLETION if path == CMPL else CHAT
    for stream in (False, True):
        body = {**base, **change, "stream": stream}
        err = assert_error(_post(fake_stack, path, json=body), 400, code)
        assert err["param"] == param, err
        assert said in err["message"], err
        assert f"('{param}')" in err["message"], err


def test_image_part_through_the_client(fake_stack: Stack) -> None:
    content = [{"type": "text", "text": "What is this?"}, IMAGE]
    with pytest.raises(openai.BadRequestError) as exc:
        _client(fake_stack).chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": content}],  # type: ignore[list-item, misc]
        )
    assert (exc.value.code, exc.value.param) == ("unsupported_value", "messages[0].content")
    assert "image content parts are not supported by this text model" in str(exc.value)


def test_unknown_route_and_method(fake_stack: Stack) -> None:
    assert_error(httpx.get(f"{fake_stack.url}/v1/nothing-here", timeout=10), 404, "not_found")
    r = httpx.get(f"{fake_stack.url}/v1/chat/completions", timeout=10)
    assert_error(r, 405, "method_not_allowed")


# models and context


def test_unknown_model(fake_stack: Stack) -> None:
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        for stream in (False, True):
            body = {**base, "model": "no-such-model", "stream": stream}
            err = assert_error(_post(fake_stack, path, json=body), 404, "model_not_found")
            assert err["param"] == "model"
            assert "no-such-model" in err["message"]


def test_max_tokens_beyond_context_api_check(fake_stack: Stack) -> None:
    """The fake worker advertises 4096 tokens: the API refuses before queueing."""
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        body = {**base, "max_tokens": 5000}
        err = assert_error(_post(fake_stack, path, json=body), 400, "context_length_exceeded")
        assert err["param"] == "max_tokens"
        r = _stream_status(fake_stack, path, {**body, "stream": True})
        assert_error(r, 400, "context_length_exceeded")


def test_prompt_plus_max_tokens_beyond_context_worker_check(fake_stack: Stack) -> None:
    """max_tokens alone fits, the prompt on top does not: the worker's 400 reaches the client,
    as an HTTP 400 even for a stream."""
    body = {**COMPLETION, "prompt": "word " * 50, "max_tokens": 4090}
    assert_error(_post(fake_stack, "/v1/completions", json=body), 400, "context_length_exceeded")
    r = _stream_status(fake_stack, "/v1/completions", {**body, "stream": True})
    assert_error(r, 400, "context_length_exceeded")


def _context(stack: Stack, model: str) -> int:
    """The context length the model's workers advertise (prompt + completion)."""
    r = httpx.get(f"{stack.url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    (entry,) = [m for m in r.json()["data"] if m["id"] == model]
    assert entry["max_model_len"] > 64, entry
    return int(entry["max_model_len"])


def _overflowing_chat(context: int, stream: bool) -> dict[str, Any]:
    """max_tokens alone fits the context (the API lets it through); with the prompt it
    does not, so the worker refuses it."""
    return {
        "model": DEMO_MODEL,
        "messages": [{"role": "user", "content": "Tell me about the sea. " * 20}],
        "max_tokens": context - 2,
        "stream": stream,
    }


@pytest.mark.parametrize("stream", [False, True])
def test_real_model_context_overflow(model_stack: Stack, stream: bool) -> None:
    context = _context(model_stack, DEMO_MODEL)
    body = _overflowing_chat(context, stream)
    r = _stream_status(model_stack, "/v1/chat/completions", body)
    err = assert_error(r, 400, "context_length_exceeded")
    assert "maximum context length" in err["message"]
    assert str(context) in err["message"]
    assert "in the messages" in err["message"], err
    assert err["param"] == "messages", err

    # max_tokens alone at the context length: refused by the API before queueing
    r = _stream_status(model_stack, "/v1/chat/completions", {**body, "max_tokens": context})
    err = assert_error(r, 400, "context_length_exceeded")
    assert err["param"] == "max_tokens"


def test_real_model_completion_context_overflow(model_stack: Stack) -> None:
    """Bug: a completion's overflow said "(10001 in the messages, ...)" with param null;
    it names the prompt now, in the message and in ``param``."""
    context = _context(model_stack, DEMO_MODEL)
    body = {"model": DEMO_MODEL, "prompt": "once upon a time " * 10, "max_tokens": context - 5}
    too_long = {"model": DEMO_MODEL, "prompt": "hello " * (context + 10), "max_tokens": 1}
    for stream in (False, True):
        for b in (body, too_long):
            r = _stream_status(model_stack, "/v1/completions", {**b, "stream": stream})
            err = assert_error(r, 400, "context_length_exceeded")
            assert str(context) in err["message"]
            assert "in the prompt" in err["message"], err
            assert "length of the prompt" in err["message"], err
            assert err["param"] == "prompt", err


def test_n_beyond_worker_slots(stack: Stack) -> None:
    """Bug: n above a worker's slots (--limit-worker-concurrency, default 8; the API allows
    n up to 16) reached the batch engine, which answered a 400 with code None. The API now
    refuses it before queueing, naming the limit."""
    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "2")
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        for stream in (False, True):
            body = {**base, "n": 3, "stream": stream}
            err = assert_error(_stream_status(stack, path, body), 400, "n_too_large")
            assert err["param"] == "n"
            assert err["type"] == "invalid_request_error"
            assert "n=2" in err["message"], err
        r = _post(stack, path, json={**base, "n": 2})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2
    with pytest.raises(openai.BadRequestError) as exc:
        _client(stack).chat.completions.create(model="fake", messages=HELLO, n=3)
    assert (exc.value.code, exc.value.param) == ("n_too_large", "n")


# the official client maps statuses to exception classes


def test_client_exceptions(fake_stack: Stack, model_stack: Stack) -> None:
    client = _client(fake_stack)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert exc.value.status_code == 404
    assert exc.value.code == "model_not_found"
    assert "no-such-model" in str(exc.value)

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="fake", messages=HELLO, temperature=3)
    assert exc.value.param == "temperature"
    assert "temperature" in str(exc.value)

    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="fake", messages=[])
    assert exc.value.param == "messages"

    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="fake", prompt="hi", max_tokens=5000, stream=True)
    assert exc.value.code == "context_length_exceeded"

    real = _client(model_stack)
    context = _context(model_stack, DEMO_MODEL)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            real.chat.completions.create(**_overflowing_chat(context, stream))
        assert exc.value.code == "context_length_exceeded"
        assert "maximum context length" in str(exc.value)
    client.close()
    real.close()


# API keys


def test_api_keys(stack: Stack) -> None:
    stack.api("--api-keys", "k1,k2")
    stack.fake_worker()
    url = f"{stack.url}/v1/chat/completions"

    assert_error(httpx.post(url, json=CHAT, timeout=30), 401, "invalid_api_key")
    for header in ("Bearer wrong", "Bearer", "Basic k1", "k1", "Bearer k1x", "Bearer k"):
        r = httpx.post(url, json=CHAT, headers={"Authorization": header}, timeout=30)
        assert_error(r, 401, "invalid_api_key")
    # the key check comes before the model check: no model names leak to strangers
    r = httpx.post(url, json={**CHAT, "model": "nope"}, timeout=30)
    assert_error(r, 401, "invalid_api_key")
    assert_error(httpx.get(f"{stack.url}/v1/models", timeout=30), 401, "invalid_api_key")

    for key in ("k1", "k2"):
        r = httpx.post(url, json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 200, r.text
    r = httpx.get(f"{stack.url}/v1/models", headers={"Authorization": "bearer k2"}, timeout=30)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["fake"]
    # health stays open for probes
    assert httpx.get(f"{stack.url}/health", timeout=30).status_code == 200

    with pytest.raises(openai.AuthenticationError) as exc:
        _client(stack, "wrong").chat.completions.create(model="fake", messages=HELLO)
    assert exc.value.status_code == 401
    assert exc.value.code == "invalid_api_key"
    assert "Incorrect API key" in str(exc.value)
    ok = _client(stack, "k1").chat.completions.create(model="fake", messages=HELLO, max_tokens=3)
    assert ok.usage.completion_tokens == 3


# capacity: 503 without a worker, 429 when the queue is full


def _retry_after(r: httpx.Response) -> float:
    assert "retry-after" in r.headers, r.headers
    value = float(r.headers["retry-after"])
    assert value >= 1
    return value


def test_known_model_without_live_worker_503(stack: Stack) -> None:
    stack.api()
    worker = stack.fake_worker()
    r = _post(stack, "/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text

    worker.kill()  # SIGKILL: no deregistration, the heartbeat key expires (TTL 4 s)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        models = httpx.get(f"{stack.url}/v1/models", timeout=10).json()["data"]
        if not models:
            break
        time.sleep(0.25)
    else:
        pytest.fail("the killed worker is still listed after 15 s")

    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        for stream in (False, True):
            r = _post(stack, path, json={**base, "stream": stream})
            err = assert_error(r, 503)
            assert err["code"] == "overloaded"
            assert err["type"] == "server_overloaded"
            assert "fake" in err["message"]
            _retry_after(r)
    # an unknown model is still a 404, not a 503
    assert_error(_post(stack, "/v1/completions", json={**COMPLETION, "model": "x"}), 404)
    r = httpx.get(f"{stack.url}/ready", timeout=10)
    assert_error(r, 503, "no_workers")
    _retry_after(r)

    with pytest.raises(openai.InternalServerError) as exc:
        _client(stack).chat.completions.create(model="fake", messages=HELLO)
    assert exc.value.status_code == 503


def test_queue_full_429(stack: Stack) -> None:
    stack.api("--max-queue", "1")
    stack.fake_worker("--fake-token-delay", "0.5", "--limit-worker-concurrency", "1")
    url = f"{stack.url}/v1/chat/completions"
    long = {**CHAT, "max_tokens": 40, "stream": True}

    with httpx.stream("POST", url, json=long, timeout=60) as held:
        assert held.status_code == 200
        lines = held.iter_lines()
        assert next(lines).startswith("id: ")  # event 0 (id line first): the job is running

        for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
            for stream in (False, True):
                r = _post(stack, path, json={**base, "stream": stream})
                err = assert_error(r, 429, "overloaded")
                assert err["type"] == "rate_limit_exceeded"
                _retry_after(r)
        with pytest.raises(openai.RateLimitError) as exc:
            _client(stack).chat.completions.create(model="fake", messages=HELLO)
        assert exc.value.status_code == 429
        assert "full" in str(exc.value)
    # leaving the stream cancels its job, which frees the queue
    deadline = time.monotonic() + 15
    while True:
        r = _post(stack, "/v1/chat/completions", json={**CHAT, "max_tokens": 2})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        assert_error(r, 429)
        time.sleep(0.25)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
