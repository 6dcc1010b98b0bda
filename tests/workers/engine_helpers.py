"""What the engine tests on the real SmolLM2 share: questions, a chat job, the text an
engine streams for it, and transformers' ``generate()`` as the reference."""

from __future__ import annotations

import time
from functools import cache

from tokenrelay.queueing.messages import ChatMessage, Job, SamplingParams, TokenLogprob
from tokenrelay.workers.engine import Engine

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three primary colors.",
    "Explain gravity to a child in two sentences.",
]


def chat_job(question: str, **params: object) -> Job:
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


def completion_job(prompt: str, **params: object) -> Job:
    return Job(
        id=f"c-{time.monotonic_ns()}",
        model="m",
        kind="completion",
        prompt=prompt,
        params=SamplingParams(**params),  # type: ignore[arg-type]
        stream=False,
        created=0,
        deadline=time.time() + 300,
    )


async def scores(engine: Engine, job: Job) -> tuple[list[TokenLogprob], list[TokenLogprob]]:
    """Choice 0's prompt entries and generated entries."""
    prompt: list[TokenLogprob] = []
    generated: list[TokenLogprob] = []
    async for events in engine.submit(job).stream():
        for event in events:
            for d in event.deltas:
                assert d.index == 0
                prompt += d.prompt_logprobs or []
                generated += d.logprobs or []
    return prompt, generated


async def collect(engine: Engine, job: Job) -> tuple[list[str], list[str | None], int]:
    """Each choice's text and finish reason, and the completion tokens, of one job."""
    n = job.params.n
    texts, finish, tokens = [""] * n, [None] * n, 0
    async for events in engine.submit(job).stream():
        for event in events:
            tokens = event.completion_tokens
            for d in event.deltas:
                texts[d.index] += d.text
                finish[d.index] = d.finish_reason or finish[d.index]
    return texts, finish, tokens


@cache  # the model is session-wide; several tests ask for the same greedy text
def reference(model, tokenizer, question: str, max_new_tokens: int) -> str:  # type: ignore[no-untyped-def]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)
