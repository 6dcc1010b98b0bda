"""Batch API lines go after interactive jobs inside the engine (issue 12), on the real
SmolLM2 model on a CPU: a line admitted while nothing interactive runs decodes at full
speed; once an interactive job arrives, the lines sit out its steps (a step's cost grows
with its sequences on a CPU) and resume after it, and no text changes for it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tokenrelay.queueing.messages import Job
from tokenrelay.workers.batch_engine import BatchEngine
from tokenrelay.workers.engine import Engine
from tokenrelay.workers.paged.engine import PagedEngine

from .engine_helpers import QUESTIONS, chat_job, reference

BATCH_TOKENS = 40
CHAT_TOKENS = 12


@pytest.fixture(scope="module", params=["batch", "paged"])
def engine(request, model_and_tokenizer) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    if request.param == "batch":
        eng: Engine = BatchEngine(model, tokenizer, slots=6, max_len=512)
    else:
        eng = PagedEngine(model, tokenizer, num_blocks=128, max_seqs=6, max_len=512)
    yield eng
    eng.close()


async def _stream(engine: Engine, job: Job, background: bool, log: list[tuple[str, int]]) -> str:
    """The job's text; each event is logged as (job id, completion tokens so far)."""
    text = ""
    async for events in engine.submit(job, background=background).stream():
        for event in events:
            log.append((job.id, event.completion_tokens))
            text += "".join(d.text for d in event.deltas)
    return text


async def test_batch_lines_sit_out_an_interactive_jobs_steps_and_keep_their_text(
    engine: Engine, model_and_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    log: list[tuple[str, int]] = []
    lines = [chat_job(q, temperature=0, max_tokens=BATCH_TOKENS) for q in QUESTIONS[1:3]]
    batch = [asyncio.create_task(_stream(engine, job, True, log)) for job in lines]
    while sum(1 for _, n in log if n >= 3) < len(lines):  # both lines are decoding
        await asyncio.sleep(0.01)
    chat = chat_job(QUESTIONS[0], temperature=0, max_tokens=CHAT_TOKENS)
    answer = await _stream(engine, chat, False, log)
    texts = await asyncio.gather(*batch)

    assert answer == reference(model, tokenizer, QUESTIONS[0], CHAT_TOKENS)
    for question, text in zip(QUESTIONS[1:3], texts, strict=True):
        assert text == reference(model, tokenizer, question, BATCH_TOKENS)
    # Between the interactive job's first and last event, a line's tokens grow by at most
    # the one step that was in flight when the job arrived.
    mine = [i for i, (job_id, _) in enumerate(log) if job_id == chat.id]
    assert mine[-1] - mine[0] + 1 >= 2, log
    during = log[mine[0] : mine[-1] + 1]
    for job in lines:
        counts = [n for job_id, n in log[: mine[-1] + 1] if job_id == job.id]
        at_first = max([n for job_id, n in log[: mine[0]] if job_id == job.id], default=0)
        assert max(counts) - at_first <= 1, (job.id, during)
    # and the lines did finish afterwards, at their full length
    assert all(n <= BATCH_TOKENS for _, n in log)


async def test_an_interactive_job_is_admitted_before_batch_lines_that_wait(
    engine: Engine,
) -> None:
    """With every sequence slot taken, a waiting interactive job gets the first free one,
    ahead of batch lines that arrived before it."""
    log: list[tuple[str, int]] = []
    slots = 6
    first = [chat_job(q, temperature=0, max_tokens=16) for q in (QUESTIONS * 2)[:slots]]
    running = [asyncio.create_task(_stream(engine, j, True, log)) for j in first]
    while sum(1 for _, n in log if n >= 1) < slots:
        await asyncio.sleep(0.01)
    later = [chat_job(q, temperature=0, max_tokens=8) for q in QUESTIONS[:2]]
    waiting = [asyncio.create_task(_stream(engine, j, True, log)) for j in later]
    await asyncio.sleep(0.05)
    chat = chat_job(QUESTIONS[3], temperature=0, max_tokens=8)
    await _stream(engine, chat, False, log)
    await asyncio.gather(*running, *waiting)
    first_event = {job_id: i for i, (job_id, _) in reversed(list(enumerate(log)))}
    assert first_event[chat.id] < min(first_event[j.id] for j in later), log
