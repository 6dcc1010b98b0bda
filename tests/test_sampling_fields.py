"""The sampling extras through the API, on the fake engine's tiny model (workers/
fake_words.py: EOS at logit 2, w1..w7 at 7, 6, 5, 4, 3, 1, 0; plain greedy is w1 forever):
each field's answer against the one worked out by hand, with the official client as well;
bad values and fields tokenrelay does not implement are a 400 naming them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis

from .openai_errors import assert_error
from .stack import Stack

GREEDY = {"model": "fake", "temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    s = Stack(redis_server.url, f"sf{uuid.uuid4().hex[:8]}")
    s.api()
    s.fake_worker()
    yield s
    s.stop()


def _complete(stack: Stack, prompt: str = "hello", **fields: Any) -> dict[str, Any]:
    body = {**GREEDY, "prompt": prompt, **fields}
    r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("fields", "text", "finish"),
    [
        # frequency 1.5: w1 7 -> 5.5 < w2 6; then w1 5.5 > w3 5; then w1 4 < w3 5
        ({"frequency_penalty": 1.5}, "w1 w2 w1 w3 ", "length"),
        # presence 1.5: w1 7 -> 5.5 < w2 6; then w2 4.5, so w1 5.5 > w3 5, and it stays
        ({"presence_penalty": 1.5}, "w1 w2 w1 w1 ", "length"),
        # repetition 2 over the prompt's w1 w2: 3.5 and 3, so w3 5; then w3 2.5 < w4 4;
        # then w1 3.5 > w5 3, and it stays (a seen token is divided once, not per repeat)
        ({"repetition_penalty": 2.0, "prompt": "w1 w2"}, "w3 w4 w1 w1 ", "length"),
        # EOS 2 + 10 wins at once; min_tokens 3 holds it back for three tokens
        ({"logit_bias": {"0": 10}}, "", "stop"),
        ({"logit_bias": {"0": 10}, "min_tokens": 3}, "w1 w1 w1 ", "stop"),
        ({"logit_bias": {"1": -100, "2": -100}}, "w3 w3 w3 w3 ", "length"),
        # w2 is e^-1 = 0.37 as likely as w1: min_p 0.5 leaves w1 alone even at temperature 1
        ({"temperature": 1.0, "min_p": 0.5, "max_tokens": 8}, "w1 " * 8, "length"),
        ({"frequency_penalty": 1.5, "stop": "w2"}, "w1 ", "stop"),
        (
            {"frequency_penalty": 1.5, "stop": "w2", "include_stop_str_in_output": True},
            "w1 w2",
            "stop",
        ),
        ({"frequency_penalty": 1.5, "stop": ["w3", " w1"]}, "w1 w2", "stop"),
    ],
)
def test_each_field_gives_the_hand_computed_answer(
    stack: Stack, fields: dict[str, Any], text: str, finish: str
) -> None:
    choice = _complete(stack, **fields)
    assert (choice["text"], choice["finish_reason"]) == (text, finish)


def test_streamed_and_chat_alike(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="EMPTY", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model="fake", messages=messages, temperature=0, max_tokens=4, frequency_penalty=1.5
    )
    assert chat.choices[0].message.content == "w1 w2 w1 w3 "
    stream = client.completions.create(
        model="fake",
        prompt="hi",
        temperature=0,
        max_tokens=4,
        presence_penalty=1.5,
        stream=True,
        extra_body={"min_tokens": 2},
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == "w1 w2 w1 w1 "
    seeded = {"temperature": 1.0, "seed": 7, "max_tokens": 16, "frequency_penalty": 0.5}
    assert _complete(stack, **seeded) == _complete(stack, **seeded)  # the seed still holds


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty", "invalid_value"),
        ({"frequency_penalty": -3}, "frequency_penalty", "invalid_value"),
        ({"repetition_penalty": 0}, "repetition_penalty", "invalid_value"),
        ({"min_p": 1.5}, "min_p", "invalid_value"),
        ({"min_tokens": -1}, "min_tokens", "invalid_value"),
        ({"min_tokens": 5}, "min_tokens", "invalid_value"),  # over max_tokens 4
        ({"logit_bias": {"abc": 1}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "invalid_value"),
        ({"logit_bias": {"8": 1}}, "logit_bias", "invalid_value"),  # the worker's vocabulary
        ({"best_of": 3}, "best_of", "unsupported_value"),
        ({"use_beam_search": True}, "use_beam_search", "unsupported_value"),
        ({"guided_json": {"type": "object"}}, "guided_json", "unsupported_value"),
        ({"suffix": "end"}, "suffix", "unsupported_value"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
        ({"skip_special_tokens": False}, "skip_special_tokens", "unsupported_value"),
    ],
)
def test_bad_values_and_unimplemented_fields_are_a_400(
    stack: Stack, change: dict[str, Any], param: str, code: str
) -> None:
    body = {**GREEDY, "prompt": "hi", **change}
    r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=60)
    err = assert_error(r, 400, code)
    assert err["param"] == param, err


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
    ],
)
def test_chat_fields_that_are_not_implemented_are_refused(
    stack: Stack, change: dict[str, Any], param: str
) -> None:
    body = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    err = assert_error(r, 400, "unsupported_value")
    assert err["param"] == param and "not supported" in err["message"], err


@pytest.mark.parametrize(
    "change",
    [
        {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}},
        {"best_of": 1, "skip_special_tokens": True, "metadata": {"a": "b"}, "store": False},
        {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0},
        {"logit_bias": {}, "min_tokens": 0, "include_stop_str_in_output": False},
        {"presence_penalty": None, "logit_bias": None, "tools": None},
    ],
)
def test_fields_at_their_neutral_values_are_accepted(stack: Stack, change: dict[str, Any]) -> None:
    body = {**GREEDY, "messages": [{"role": "user", "content": "hi"}], **change}
    r = httpx.post(f"{stack.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("t0.")  # no extras: plain


def test_a_job_names_the_extras_it_sets_so_an_older_worker_refuses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenrelay.api.schemas import ChatCompletionRequest
    from tokenrelay.queueing import messages

    body = {**GREEDY, "messages": [{"role": "user", "content": "hi"}]}
    plain = ChatCompletionRequest.model_validate(body).to_job(60)
    asked = ChatCompletionRequest.model_validate(
        {**body, "presence_penalty": 0.5, "logit_bias": {"3": 1}, "min_p": 0}
    ).to_job(60)
    assert (plain.needs, asked.needs) == ([], ["presence_penalty", "logit_bias"])
    wire = messages.Job.model_validate_json(asked.model_dump_json())
    assert wire.params.logit_bias == {3: 1.0} and wire.unknown_needs() == []
    older = messages.KNOWN_NEEDS - set(messages.EXTRA_FIELDS)  # the release before them
    monkeypatch.setattr(messages, "KNOWN_NEEDS", older)
    assert (
        wire.unknown_needs() == ["presence_penalty", "logit_bias"] and plain.unknown_needs() == []
    )
