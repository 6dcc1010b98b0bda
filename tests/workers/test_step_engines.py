"""The transformers step engine (--engine hf) and FastChat's-way baseline (--engine
generate) on the real SmolLM2: greedy text equals generate(), and cancel ends a job."""

from __future__ import annotations

import pytest

from tokenrelay.workers.generate_engine import GenerateEngine
from tokenrelay.workers.hf_engine import HFEngine

from .engine_helpers import QUESTIONS, chat_job, collect, reference


@pytest.fixture(scope="module", params=[HFEngine, GenerateEngine], ids=["hf", "generate"])
def engine(request, model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    eng = request.param(model, tokenizer)
    yield eng
    eng.close()


async def test_greedy_equals_generate(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    texts, finish, tokens = await collect(
        engine, chat_job(QUESTIONS[0], temperature=0, max_tokens=20)
    )
    assert texts[0] == reference(model, tokenizer, QUESTIONS[0], 20)
    assert "Paris" in texts[0]
    assert finish[0] == "stop" and tokens > 0


async def test_cancel_ends_the_job(engine) -> None:  # type: ignore[no-untyped-def]
    job = chat_job(QUESTIONS[1], temperature=1.0, max_tokens=300, ignore_eos=True)
    handle = engine.submit(job)
    events = 0
    async for batch in handle.stream():
        events += len(batch)
        if events >= 3:
            engine.cancel(job.id)
    assert events < 40
