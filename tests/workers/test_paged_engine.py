"""The paged engine on the real SmolLM2, on CPU: greedy output equals ``generate()`` with
other jobs sharing the batch or joining mid-generation; seeds reproduce whatever shares the
batch; a cache too small for everyone preempts and still gives every job its own text;
cancel ends the stream; blocks all come back."""

from __future__ import annotations

import asyncio
import random

import pytest

from tokenrelay.workers.paged.blocks import BlockManager, BlockTable, OutOfBlocks
from tokenrelay.workers.paged.build import build_paged_engine
from tokenrelay.workers.paged.engine import PagedEngine
from tokenrelay.workers.prompts import encode_prompt

from .engine_helpers import QUESTIONS, chat_job, collect, reference


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    eng = PagedEngine(model, tokenizer, num_blocks=256, max_seqs=6, max_len=1024)
    yield eng
    eng.close()


async def test_greedy_text_equals_generate_with_others_in_the_batch(
    engine: PagedEngine, model_and_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    jobs = [chat_job(q, temperature=0, max_tokens=24) for q in QUESTIONS]
    results = await asyncio.gather(*(collect(engine, j) for j in jobs))
    for question, (texts, finish, _) in zip(QUESTIONS, results, strict=True):
        assert texts[0] == reference(model, tokenizer, question, 24), question
        assert finish[0] in ("stop", "length")
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


async def test_several_steps_a_launch_give_the_same_text_and_stop_exactly(
    model_and_tokenizer,
) -> None:  # type: ignore[no-untyped-def]
    """Decode steps launched three at a time (the GPU default is 4): the same greedy text,
    stops and max_tokens honoured to the token, and a request that fills the context to
    its last position gets all of it."""
    model, tokenizer = model_and_tokenizer
    eng = PagedEngine(model, tokenizer, num_blocks=128, max_seqs=4, max_len=96, steps_per_launch=3)
    try:
        jobs = [
            chat_job(q, temperature=0, max_tokens=n)
            for q, n in zip(QUESTIONS, (7, 24, 13, 1), strict=True)
        ]
        results = await asyncio.gather(*(collect(eng, j) for j in jobs))
        for job, (texts, _, tokens) in zip(jobs, results, strict=True):
            want = reference(model, tokenizer, job.messages[0].content, job.params.max_tokens)
            assert texts[0] == want
            assert tokens <= job.params.max_tokens
        prompt = len(encode_prompt(tokenizer, chat_job(QUESTIONS[0])))
        room = 96 - prompt
        texts, finish, tokens = await collect(
            eng, chat_job(QUESTIONS[0], temperature=0, max_tokens=room, ignore_eos=True)
        )
        assert (tokens, finish[0]) == (room, "length")
        assert eng.blocks.free_blocks == eng.blocks.num_blocks
    finally:
        eng.close()


async def test_jobs_joining_mid_generation_get_the_same_greedy_text(
    engine: PagedEngine, model_and_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    tasks = []
    for q in QUESTIONS:
        job = chat_job(q, temperature=0, max_tokens=24)
        tasks.append(asyncio.create_task(collect(engine, job)))
        await asyncio.sleep(0.05)  # the others are mid-generation when this one joins
    results = await asyncio.gather(*tasks)
    for question, (texts, _, _) in zip(QUESTIONS, results, strict=True):
        assert texts[0] == reference(model, tokenizer, question, 24), question
    assert "Paris" in results[0][0][0]


async def test_seed_reproduces_whatever_the_batch(engine: PagedEngine) -> None:
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_tokens": 20}
    alone = await collect(engine, chat_job(QUESTIONS[1], **params))
    crowd = await asyncio.gather(
        collect(engine, chat_job(QUESTIONS[1], **params)),
        collect(engine, chat_job(QUESTIONS[2], temperature=0.8, max_tokens=25)),
        collect(engine, chat_job(QUESTIONS[3], temperature=0, max_tokens=15)),
    )
    assert crowd[0][0] == alone[0]


async def test_n_choices_share_the_prompt_and_each_run_to_the_limit(engine: PagedEngine) -> None:
    texts, finish, tokens = await collect(
        engine, chat_job(QUESTIONS[1], temperature=0.9, max_tokens=8, n=3, seed=7, ignore_eos=True)
    )
    assert len(texts) == 3 and all(texts)
    assert finish == ["length"] * 3
    assert tokens == 24
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


async def test_the_cpu_layout_one_block_a_sequence_gives_the_same_text(
    model_and_tokenizer,
) -> None:  # type: ignore[no-untyped-def]
    """What a worker builds on a CPU: one block a sequence, as long as the longest, read in
    place by decode attention; greedy text, n choices (a fork copies the prompt's rows) and
    a seed behave as with 16-token blocks."""
    model, tokenizer = model_and_tokenizer
    eng = build_paged_engine(model, tokenizer, max_model_len=2048, max_seqs=5)
    try:
        assert eng.cache.block_size == 2048 and eng.blocks.num_blocks == 5
        jobs = [chat_job(q, temperature=0, max_tokens=16) for q in QUESTIONS]
        results = await asyncio.gather(*(collect(eng, j) for j in jobs))
        for question, (texts, _, _) in zip(QUESTIONS, results, strict=True):
            assert texts[0] == reference(model, tokenizer, question, 16), question
        seeded = chat_job(QUESTIONS[1], temperature=0.9, max_tokens=8, n=2, seed=7)
        first, again = await asyncio.gather(collect(eng, seeded), collect(eng, seeded))
        assert first[0] == again[0] and len(first[0]) == 2 and all(first[0])
        assert eng.blocks.free_blocks == eng.blocks.num_blocks
    finally:
        eng.close()


async def test_a_full_cache_preempts_and_every_job_gets_its_own_text(
    model_and_tokenizer,
) -> None:  # type: ignore[no-untyped-def]
    """More sequences than the cache holds: the newest are preempted (recomputed later)
    and finish with the same greedy text as when run alone; no request fails for it."""
    model, tokenizer = model_and_tokenizer
    # 12 blocks of 16 = 192 tokens; each job needs about 40 prompt + 40 new tokens
    small = PagedEngine(model, tokenizer, num_blocks=12, max_seqs=4, max_len=512)
    try:
        jobs = [chat_job(q, temperature=0, max_tokens=40, ignore_eos=True) for q in QUESTIONS]
        results = await asyncio.gather(*(collect(small, j) for j in jobs))
        assert small.preemptions > 0
        for question, (texts, _, tokens) in zip(QUESTIONS, results, strict=True):
            alone = await collect(
                small, chat_job(question, temperature=0, max_tokens=40, ignore_eos=True)
            )
            assert texts == alone[0] and tokens == 40, question
        assert small.blocks.free_blocks == small.blocks.num_blocks
    finally:
        small.close()


async def test_cancel_frees_the_blocks(engine: PagedEngine) -> None:
    job = chat_job(QUESTIONS[3], temperature=0, max_tokens=400, ignore_eos=True)
    handle = engine.submit(job)
    events = 0
    async for batch in handle.stream():
        events += len(batch)
        engine.cancel(job.id)
    assert events < 20  # of 400: the stream ends within a few steps
    for _ in range(100):
        if engine.blocks.free_blocks == engine.blocks.num_blocks:
            break
        await asyncio.sleep(0.05)
    assert engine.blocks.free_blocks == engine.blocks.num_blocks


def test_block_accounting_survives_random_join_leave_fork_and_preempt() -> None:
    """1,000 random cycles: every block ends free, and none is ever owned twice."""
    rng = random.Random(11)
    blocks = BlockManager(64, 16)
    live: list[tuple[BlockTable, int]] = []
    for _ in range(1000):
        op = rng.random()
        if op < 0.35:  # join
            table, length = BlockTable(), rng.randint(1, 200)
            try:
                blocks.allocate(table, length)
                live.append((table, length))
            except OutOfBlocks:
                assert table.blocks == []
        elif op < 0.6 and live:  # grow
            i = rng.randrange(len(live))
            table, length = live[i]
            try:
                blocks.allocate(table, length + rng.randint(1, 40))
                live[i] = (table, len(table.blocks) * 16)
            except OutOfBlocks:
                pass
        elif op < 0.75 and live:  # fork (the n choices of one prompt)
            table, length = rng.choice(live)
            child = blocks.fork(table, length)
            try:
                blocks.allocate(child, length + 1)
                live.append((child, length + 1))
            except OutOfBlocks:
                blocks.free(child)
        elif live:  # leave, cancel or preempt: all give every block back
            table, _ = live.pop(rng.randrange(len(live)))
            blocks.free(table)
        blocks.check()
        owned = [b for t, _ in live for b in t.blocks]
        assert blocks.free_blocks + len(set(owned)) == 64
    for table, _ in live:
        blocks.free(table)
    blocks.check()
    assert blocks.free_blocks == 64
