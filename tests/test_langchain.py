"""LangChain's OpenAI classes pointed at tokenrelay, as a LangChain user writes them.

``ChatOpenAI`` (invoke, stream) against the real SmolLM2 worker and ``OpenAIEmbeddings``
(embed_documents, embed_query) against the real all-MiniLM-L6-v2 worker, each checked
against the official openai client's answer to the same request. OpenAIEmbeddings needs
``check_embedding_ctx_length=False``: by default it tokenizes with tiktoken (which downloads
OpenAI's encodings, and whose token ids mean nothing to another model's vocabulary).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis

from .conftest import DEMO_MODEL
from .stack import Stack

langchain_openai = pytest.importorskip(
    "langchain_openai", reason="langchain-openai is not installed (pip install langchain-openai)"
)

EMBED_MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The capital of France is Paris.", "Redis streams hold the job queue.", "a"]
QUESTION = "Name three colours."


@pytest.fixture(scope="module")
def lc_stack(redis_server: EmbeddedRedis, demo_model: Path) -> Iterator[Stack]:
    """An API, a SmolLM2 worker and a MiniLM embedding worker."""
    from tokenrelay.embedding_model import embedding_model_path

    s = Stack(redis_server.url, f"lc{uuid.uuid4().hex[:8]}")
    s.api()
    s.worker("--model-path", str(demo_model), "--model-names", DEMO_MODEL)
    s.worker("--model-path", str(embedding_model_path()))
    yield s
    s.stop()


def _openai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)


def _chat(stack: Stack, **extra: object) -> object:
    return langchain_openai.ChatOpenAI(
        model=DEMO_MODEL,
        base_url=f"{stack.url}/v1",
        api_key="none",
        temperature=0,
        max_tokens=24,
        seed=7,
        max_retries=0,
        **extra,
    )


def test_chat_openai_invoke_and_stream(lc_stack: Stack) -> None:
    expected = (
        _openai(lc_stack)
        .chat.completions.create(
            model=DEMO_MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=24,
            seed=7,
        )
        .choices[0]
        .message.content
    )
    assert expected
    llm = _chat(lc_stack)
    answer = llm.invoke(QUESTION)  # type: ignore[attr-defined]
    assert answer.content == expected
    assert answer.usage_metadata["output_tokens"] > 0
    pieces = list(llm.stream(QUESTION))  # type: ignore[attr-defined]
    assert "".join(p.content for p in pieces) == expected
    # stream_usage: the usage chunk (stream_options.include_usage) reaches LangChain
    streamed = list(_chat(lc_stack, stream_usage=True).stream(QUESTION))  # type: ignore[attr-defined]
    usage = [p.usage_metadata for p in streamed if p.usage_metadata]
    assert usage and usage[-1]["output_tokens"] == answer.usage_metadata["output_tokens"]


def test_openai_embeddings(lc_stack: Stack) -> None:
    client = _openai(lc_stack)
    expected = [
        d.embedding
        for d in client.embeddings.create(
            model=EMBED_MODEL, input=TEXTS, encoding_format="float"
        ).data
    ]
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=EMBED_MODEL,
        base_url=f"{lc_stack.url}/v1",
        api_key="none",
        check_embedding_ctx_length=False,  # send the texts, not tiktoken's token ids
        max_retries=0,
    )
    got = embeddings.embed_documents(TEXTS)
    assert len(got) == len(TEXTS)
    for vector, want in zip(got, expected, strict=True):
        assert len(vector) == len(want) == 384
        assert max(abs(a - b) for a, b in zip(vector, want, strict=True)) < 1e-5
    query = embeddings.embed_query(TEXTS[0])
    assert max(abs(a - b) for a, b in zip(query, expected[0], strict=True)) < 1e-5
