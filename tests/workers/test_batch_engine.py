"""The slotted batch engine (what `--engine auto` runs on a CPU for Llama, Mistral and
Qwen2 shapes) on the real SmolLM2: its runner's greedy tokens equal transformers', jobs
joining mid-generation get generate()'s text, seeds reproduce, cancel frees the slot."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tokenrelay.workers.batch_engine import BatchEngine
from tokenrelay.workers.llama_runner import LlamaRunner

from .engine_helpers import QUESTIONS, chat_job, collect, reference


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    eng = BatchEngine(model, tokenizer, slots=6, max_len=512)
    yield eng
    eng.close()


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


async def test_jobs_joining_mid_generation_get_generates_text(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    tasks = []
    for q in QUESTIONS:
        tasks.append(
            asyncio.create_task(collect(engine, chat_job(q, temperature=0, max_tokens=30)))
        )
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks)
    for q, (texts, finish, _) in zip(QUESTIONS, results, strict=True):
        assert texts[0] == reference(model, tokenizer, q, 30)
        assert finish[0] in ("stop", "length")
    assert "Paris" in results[0][0][0]


async def test_seed_reproduces_and_n_choices_run_to_the_limit(engine) -> None:  # type: ignore[no-untyped-def]
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 20}
    alone = await collect(engine, chat_job(QUESTIONS[1], **params))
    crowd = await asyncio.gather(
        collect(engine, chat_job(QUESTIONS[1], **params)),
        collect(engine, chat_job(QUESTIONS[2], temperature=0.8, max_tokens=25)),
        collect(engine, chat_job(QUESTIONS[3], temperature=0, max_tokens=15)),
    )
    assert crowd[0][0] == alone[0]
    texts, finish, tokens = await collect(
        engine, chat_job(QUESTIONS[1], temperature=1.0, n=3, max_tokens=8, ignore_eos=True)
    )
    assert len(texts) == 3 and all(texts) and finish == ["length"] * 3 and tokens == 24


async def test_cancel_frees_the_slot(engine) -> None:  # type: ignore[no-untyped-def]
    job = chat_job(QUESTIONS[1], temperature=1.0, max_tokens=400, ignore_eos=True)
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
