"""The batch engine on the real SmolLM2, on CPU: greedy output equals transformers'
``generate()``, whatever else shares the batch; seeds reproduce; cancel frees the slot."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tokenrelay.queueing.messages import ChatMessage, Job, SamplingParams
from tokenrelay.workers.batch_engine import BatchEngine
from tokenrelay.workers.llama_runner import LlamaRunner

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three primary colors.",
    "Explain gravity to a child in two sentences.",
]


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    eng = BatchEngine(model, tokenizer, slots=6, max_len=512)
    yield eng
    eng.close()


def _job(question: str, **params: object) -> Job:
    return Job(
        id=f"j-{time.monotonic_ns()}",
        model="m",
        kind="chat",
        messages=[ChatMessage(role="user", content=question)],
        params=SamplingParams(**params),  # type: ignore[arg-type]
        stream=True,
        created=0,
        deadline=time.time() + 300,
    )


async def _collect(engine: BatchEngine, job: Job) -> tuple[list[str], list[str | None], int]:
    n = job.params.n
    texts, finish, tokens = [""] * n, [None] * n, 0
    async for events in engine.submit(job).stream():
        for event in events:
            tokens = event.completion_tokens
            for d in event.deltas:
                texts[d.index] += d.text
                finish[d.index] = d.finish_reason or finish[d.index]
    return texts, finish, tokens


def _reference(model, tokenizer, question: str, max_new_tokens: int) -> str:  # type: ignore[no-untyped-def]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def test_runner_greedy_tokens_equal_transformers(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    runner = LlamaRunner(model, slots=2, max_len=256)
    prompts, refs = [], []
    for q in QUESTIONS[:2]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt"
        )["input_ids"]
        prompts.append(ids[0].tolist())
        refs.append(model.generate(ids, max_new_tokens=24, do_sample=False)[0][ids.shape[1] :])
    seqs = [[int(runner.prefill(slot, p).argmax())] for slot, p in enumerate(prompts)]
    for _ in range(23):
        tokens = torch.tensor([s[-1] for s in seqs])
        positions = torch.tensor([len(p) + len(s) - 1 for p, s in zip(prompts, seqs, strict=True)])
        logits = runner.decode(tokens, positions)
        for i, s in enumerate(seqs):
            s.append(int(logits[i].argmax()))
    for ref, got in zip(refs, seqs, strict=True):
        n = len(ref)  # transformers stops at EOS
        assert got[:n] == ref.tolist()


async def test_batched_greedy_equals_generate(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    # Staggered starts: jobs join while others are mid-generation.
    tasks = []
    for q in QUESTIONS:
        tasks.append(asyncio.create_task(_collect(engine, _job(q, temperature=0, max_tokens=30))))
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks)
    for q, (texts, finish, _) in zip(QUESTIONS, results, strict=True):
        assert texts[0] == _reference(model, tokenizer, q, 30)
        assert finish[0] in ("stop", "length")
    assert "Paris" in results[0][0][0]


async def test_seed_reproduces_whatever_the_batch(engine) -> None:  # type: ignore[no-untyped-def]
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 20}
    alone = await _collect(engine, _job(QUESTIONS[1], **params))
    crowd = await asyncio.gather(
        _collect(engine, _job(QUESTIONS[1], **params)),
        _collect(engine, _job(QUESTIONS[2], temperature=0.8, max_tokens=25)),
        _collect(engine, _job(QUESTIONS[3], temperature=0, max_tokens=15)),
    )
    assert crowd[0][0] == alone[0]


async def test_n_choices_and_length_limit(engine) -> None:  # type: ignore[no-untyped-def]
    texts, finish, tokens = await _collect(
        engine, _job(QUESTIONS[1], temperature=1.0, n=3, max_tokens=8, ignore_eos=True)
    )
    assert len(texts) == 3 and all(texts)
    assert finish == ["length"] * 3
    assert tokens == 24


async def test_cancel_frees_the_slot(engine) -> None:  # type: ignore[no-untyped-def]
    job = _job(QUESTIONS[1], temperature=1.0, max_tokens=400, ignore_eos=True)
    handle = engine.submit(job)
    got = 0
    async for events in handle.stream():
        got += len(events)
        if got >= 3:
            engine.cancel(job.id)
    assert got < 20
    deadline = time.monotonic() + 60  # a hang guard: the slot frees within a step
    while len(engine._free) != engine.runner.slots and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(engine._free) == engine.runner.slots


async def test_prompts_prefilled_together_equal_generate(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Prompts of different lengths submitted in one tick share one padded prefill."""
    model, tokenizer = model_and_tokenizer
    jobs = [_job(q, temperature=0, max_tokens=12) for q in QUESTIONS]
    results = await asyncio.gather(*(_collect(engine, j) for j in jobs))
    for q, (texts, _, _) in zip(QUESTIONS, results, strict=True):
        assert texts[0] == _reference(model, tokenizer, q, 12)
