"""The Batch API answered by the real model: the official openai client uploads a chat and a
completions batch, polls them to completed and reads the answers back by custom_id."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from .batch_files import chat_line, completion_line, lines_of, start, wait_for
from .conftest import DEMO_MODEL
from .stack import Stack

QUESTIONS = [f"What is {i} plus {i}?" for i in range(10)]


@pytest.fixture(scope="module")
def client(model_stack: Stack) -> Iterator[openai.OpenAI]:
    model_stack.batch_worker()
    c = openai.OpenAI(base_url=f"{model_stack.url}/v1", api_key="EMPTY", max_retries=0)
    yield c
    c.close()


def test_chat_and_completion_batches_are_answered_by_custom_id(client: openai.OpenAI) -> None:
    sampling = {"max_tokens": 4, "temperature": 0}
    chats = [chat_line(f"chat-{i}", DEMO_MODEL, q, **sampling) for i, q in enumerate(QUESTIONS)]
    prompts = [
        completion_line(f"text-{i}", DEMO_MODEL, f"Q: {q}\nA:", **sampling)
        for i, q in enumerate(QUESTIONS)
    ]
    started = [start(client, chats), start(client, prompts, "/v1/completions")]
    for created, kind in zip(started, ("chat", "text"), strict=True):
        batch = wait_for(client, created.id, timeout=120)
        assert batch.status == "completed", batch
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (10, 0)
        assert batch.error_file_id is None
        answers = {x["custom_id"]: x for x in lines_of(client, batch.output_file_id)}
        assert sorted(answers) == sorted(f"{kind}-{i}" for i in range(10))
        prompt_tokens = completion_tokens = 0
        for answer in answers.values():
            response = answer["response"]
            assert response["status_code"] == 200 and answer["error"] is None
            body = response["body"]
            choice = body["choices"][0]
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            assert text.strip() and body["model"] == DEMO_MODEL
            usage = body["usage"]
            assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 4
            prompt_tokens += usage["prompt_tokens"]
            completion_tokens += usage["completion_tokens"]
        # the batch's usage adds up its lines'
        assert batch.usage is not None
        assert (batch.usage.input_tokens, batch.usage.output_tokens) == (
            prompt_tokens,
            completion_tokens,
        )
