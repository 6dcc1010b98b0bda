"""On a CUDA GPU: the batch engine's prefill and decode (eager and CUDA graphs) compute
transformers' logits.

Random weights give nearly flat logits, where the last bit of rounding decides an argmax,
so this compares logits along a fixed (teacher-forced) continuation; exact greedy equality
on real weights is tested on the CPU with SmolLM2 (test_batch_engine.py).
"""

from __future__ import annotations

import pytest
import torch

from tokenrelay.bench.models import random_llama
from tokenrelay.workers.llama_runner import LlamaRunner

pytestmark = pytest.mark.gpu

PROMPTS = (17, 40, 64)
STEPS = 24


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_llama("1b", "cuda", torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    seqs = [torch.randint(0, 128000, (n + STEPS,), generator=g).tolist() for n in PROMPTS]
    with torch.inference_mode():
        refs = [model(torch.tensor([s], device="cuda")).logits[0].float() for s in seqs]
    return model, seqs, refs


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_prefill_matches(setup) -> None:  # type: ignore[no-untyped-def]
    model, seqs, refs = setup
    runner = LlamaRunner(model, slots=4, max_len=256)
    for slot, (s, n, ref) in enumerate(zip(seqs, PROMPTS, refs, strict=True)):
        assert _close(runner.prefill(slot, s[:n]), ref[n - 1]) < 1e-3


@pytest.mark.parametrize("graphs", [False, True])
def test_decode_matches(setup, graphs: bool) -> None:  # type: ignore[no-untyped-def]
    model, seqs, refs = setup
    runner = LlamaRunner(model, slots=4, max_len=256)
    runner.use_graphs = graphs
    runner.capture_graphs()
    for slot, (s, n) in enumerate(zip(seqs, PROMPTS, strict=True)):
        runner.prefill(slot, s[:n])
    got: list[list[torch.Tensor]] = [[] for _ in PROMPTS]
    for step in range(STEPS):
        tokens = torch.tensor(
            [s[n + step] for s, n in zip(seqs, PROMPTS, strict=True)], device="cuda"
        )
        positions = torch.tensor([n + step for n in PROMPTS], device="cuda")
        logits = runner.decode(tokens, positions)
        for i in range(len(PROMPTS)):
            got[i].append(logits[i].clone())
    for i, n in enumerate(PROMPTS):
        errors = [_close(got[i][k], refs[i][n + k]) for k in range(STEPS)]
        assert max(errors) < 1e-3, (i, [round(e, 4) for e in errors])


async def _engine_greedy(engine, prompts: list[str], new_tokens: int) -> list[str]:  # type: ignore[no-untyped-def]
    import asyncio
    import time

    from tokenrelay.queueing.messages import Job, SamplingParams

    async def one(i: int, prompt: str) -> str:
        job = Job(
            id=f"g{i}",
            model="m",
            kind="completion",
            prompt=prompt,
            params=SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True),
            stream=True,
            created=0,
            deadline=time.time() + 300,
        )
        text = ""
        async for events in engine.submit(job).stream():
            for event in events:
                text += "".join(d.text for d in event.deltas)
        return text

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


async def test_engine_greedy_equals_generate() -> None:
    """The whole batch engine (batched prefill, CUDA-graph decode, several jobs sharing the
    batch) gives the same greedy tokens as transformers' generate() on the same weights.
    float32 without TF32: random weights' logits are nearly flat, and only at full precision
    does no near-tie flip an argmax between two correct implementations."""
    from tokenrelay.bench.models import prompt_words, synthetic_tokenizer
    from tokenrelay.workers.batch_engine import BatchEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_llama("1b", "cuda", torch.float32)
    tokenizer = synthetic_tokenizer()
    prompts = [prompt_words(n, salt=n) for n in (9, 33, 70, 128)]
    new_tokens = 48
    refs = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt")["input_ids"].to("cuda")
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
        refs.append(tokenizer.decode(out[0][ids.shape[1] :]))
    engine = BatchEngine(model, tokenizer, slots=8, max_len=512)
    try:
        got = await _engine_greedy(engine, prompts, new_tokens)
    finally:
        engine.close()
    for want, have in zip(refs, got, strict=True):
        assert have.split() == want.split()
