"""The official ``openai`` client against the real SmolLM2 model, as a user would call it.

Greedy decoding (temperature 0) makes the model's answer to the France question stable:
"The capital of France is Paris." followed by its end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import DEMO_MODEL
from .openai_errors import assert_error
from .stack import Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(model_stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{model_stack.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def paris(client: openai.OpenAI) -> openai.types.chat.ChatCompletion:
    """The greedy, unconstrained answer to the France question (shared by several tests)."""
    return client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, max_tokens=48
    )


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if not isinstance(out, list) else out  # BatchEncoding in transformers 5
    assert ids and isinstance(ids[0], int), out
    return list(ids)


def _stream_chat(client: openai.OpenAI, **kw: Any) -> list[Any]:
    return list(client.chat.completions.create(model=DEMO_MODEL, stream=True, **kw))


def _texts(chunks: list[Any], n: int = 1) -> tuple[list[str], list[str | None]]:
    """Per-choice concatenated content and finish reason of a chat stream."""
    texts, finish = [""] * n, [None] * n
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                assert finish[choice.index] is None, "two finish reasons for one choice"
                finish[choice.index] = choice.finish_reason
    return texts, finish


# chat


def test_chat_answers_paris(paris: openai.types.chat.ChatCompletion) -> None:
    assert paris.object == "chat.completion"
    assert paris.id.startswith("chatcmpl-")
    assert paris.model == DEMO_MODEL
    assert len(paris.choices) == 1
    choice = paris.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"


def test_chat_stream_answers_paris(
    client: openai.OpenAI, paris: openai.types.chat.ChatCompletion
) -> None:
    chunks = _stream_chat(client, messages=QUESTION, temperature=0, max_tokens=48)
    assert chunks
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    (text,), (finish,) = _texts(chunks)
    assert "Paris" in text
    assert finish == "stop"
    assert text == paris.choices[0].message.content  # same greedy answer, streamed or not
    assert all(c.usage is None for c in chunks)  # no usage unless asked for


def test_max_tokens_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.choices[0].message.content

    chunks = _stream_chat(client, messages=QUESTION, temperature=0, max_tokens=5)
    (text,), (finish,) = _texts(chunks)
    assert finish == "length"
    assert text == r.choices[0].message.content


# usage


def test_usage_matches_tokenizer(paris: openai.types.chat.ChatCompletion, tokenizer: Any) -> None:
    content = paris.choices[0].message.content
    usage = paris.usage
    assert usage.prompt_tokens == len(_chat_ids(tokenizer, QUESTION))
    generated = len(tokenizer(content, add_special_tokens=False).input_ids)
    assert usage.completion_tokens in (generated, generated + 1)  # + the end-of-turn token
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_include_usage(
    client: openai.OpenAI, paris: openai.types.chat.ChatCompletion
) -> None:
    chunks = _stream_chat(
        client,
        messages=QUESTION,
        temperature=0,
        max_tokens=48,
        stream_options={"include_usage": True},
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump() == paris.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.choices for c in chunks[:-1])
    (text,), (finish,) = _texts(chunks)
    assert text == paris.choices[0].message.content
    assert finish == "stop"


# text completions


def test_completions(client: openai.OpenAI, tokenizer: Any) -> None:
    r = client.completions.create(model=DEMO_MODEL, prompt=PROMPT, temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert len(r.choices) == 1
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(
        client.completions.create(
            model=DEMO_MODEL,
            prompt=PROMPT,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.id for c in chunks} == {chunks[0].id}
    body, last = chunks[:-1], chunks[-1]
    assert last.choices == []
    assert last.usage.model_dump() == r.usage.model_dump()
    assert "".join(c.choices[0].text for c in body) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [
        r.choices[0].finish_reason
    ]


# n > 1


def test_n_two_choices(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, max_tokens=24, n=2
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert "Paris" in c.message.content
        assert c.finish_reason in ("stop", "length")

    chunks = _stream_chat(client, messages=QUESTION, temperature=0, max_tokens=24, n=2)
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {ch.index for c in chunks for ch in c.choices} == {0, 1}
    texts, finish = _texts(chunks, n=2)
    assert texts == [c.message.content for c in r.choices]
    assert finish == [c.finish_reason for c in r.choices]


def test_n_two_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=DEMO_MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=0.8, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert any(c.text for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 12  # summed over the choices


# stop strings


def test_stop_string(client: openai.OpenAI, paris: openai.types.chat.ChatCompletion) -> None:
    full = paris.choices[0].message.content
    r = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, temperature=0, max_tokens=48, stop=["Paris"]
    )
    content = r.choices[0].message.content
    assert "Paris" not in content
    assert r.choices[0].finish_reason == "stop"
    assert content == full[: full.index("Paris")]


@pytest.mark.parametrize("stop", ["Paris", "Paris.", "is Paris"])
def test_stop_string_streamed_never_leaks(
    client: openai.OpenAI, paris: openai.types.chat.ChatCompletion, stop: str
) -> None:
    """No piece of the stop string reaches the client, not even a prefix held in a delta."""
    full = paris.choices[0].message.content
    assert stop in full
    chunks = _stream_chat(client, messages=QUESTION, temperature=0, max_tokens=48, stop=[stop])
    (text,), (finish,) = _texts(chunks)
    assert finish == "stop"
    assert text == full[: full.index(stop)]
    assert stop not in text
    assert not any(text.endswith(stop[:k]) for k in range(1, len(stop)))


def test_stop_string_partial_match_is_released(
    client: openai.OpenAI, paris: openai.types.chat.ChatCompletion
) -> None:
    """Text held back because it could start a stop string comes out once it cannot."""
    full = paris.choices[0].message.content
    stop = "Paris, the"
    assert stop not in full
    chunks = _stream_chat(client, messages=QUESTION, temperature=0, max_tokens=48, stop=[stop])
    (text,), (finish,) = _texts(chunks)
    assert text == full
    assert finish == "stop"


# models


def test_models_retrieve(client: openai.OpenAI) -> None:
    """Bug: GET /v1/models/{id} was a 404, so client.models.retrieve() failed."""
    model = client.models.retrieve(DEMO_MODEL)
    assert (model.id, model.object, model.owned_by) == (DEMO_MODEL, "model", "tokenrelay")
    assert model.created > 0
    (listed,) = [m for m in client.models.list().data if m.id == DEMO_MODEL]
    assert model.model_dump() == listed.model_dump()  # max_model_len and workers too


def test_models_retrieve_names_with_slashes_unknown_ids_and_keys(stack: Stack) -> None:
    stack.api("--api-keys", "k1")
    stack.fake_worker("--model-names", "org/Fake-1.5,plain")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k1", max_retries=0, timeout=60)
    for name in ("org/Fake-1.5", "plain"):
        model = client.models.retrieve(name)  # the client sends "/" as %2F
        assert (model.id, model.object) == (name, "model")
        extra = {"max_model_len": 4096, "workers": 1, "weights": [], "task": "generate"}
        assert model.model_extra == extra
    r = httpx.get(
        f"{stack.url}/v1/models/org/Fake-1.5", headers={"Authorization": "Bearer k1"}, timeout=30
    )
    assert r.status_code == 200 and r.json()["id"] == "org/Fake-1.5", r.text

    for unknown in ("nope", "org/nope", "org"):
        with pytest.raises(openai.NotFoundError) as exc:
            client.models.retrieve(unknown)
        assert exc.value.code == "model_not_found"
        assert unknown in str(exc.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0).models.retrieve(
            "plain"
        )
    assert_error(httpx.get(f"{stack.url}/v1/models/plain", timeout=30), 401, "invalid_api_key")
    client.close()
