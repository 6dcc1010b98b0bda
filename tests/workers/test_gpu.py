"""On a CUDA GPU, a 1B Llama of random weights in float32 without TF32: the paged runner's
prefill and decode (eager, and compiled into CUDA graphs) compute transformers' logits, and
the whole paged engine, several prompts sharing the batch, gives generate()'s greedy tokens.

Random weights give nearly flat logits, where the last bit of rounding decides an argmax,
so the runner is compared on logits along a fixed (teacher-forced) continuation. Greedy
text on real weights is compared on the CPU with SmolLM2 (test_paged_engine.py), and every
architecture family's greedy tokens on tiny configs, CUDA too, in test_paged_runner.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tokenrelay.bench.models import VOCAB, prompt_words, random_llama, synthetic_tokenizer
from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.workers.paged.blocks import BlockManager, BlockTable
from tokenrelay.workers.paged.cache import CacheShape, KVCache
from tokenrelay.workers.paged.engine import PagedEngine
from tokenrelay.workers.paged.runner import ModelRunner, SeqInput

pytestmark = pytest.mark.gpu

PROMPTS = (17, 40, 64)
STEPS = 24


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    torch.backends.cuda.matmul.allow_tf32 = False
    return random_llama("1b", "cuda", torch.float32)


@pytest.fixture(scope="module")
def forced(model):  # type: ignore[no-untyped-def]
    """Prompts with their continuations, and transformers' logits at every position."""
    g = torch.Generator(device="cpu").manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (n + STEPS,), generator=g).tolist() for n in PROMPTS]
    with torch.inference_mode():
        refs = [model(torch.tensor([s], device="cuda")).logits[0].float() for s in seqs]
    return seqs, refs


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _prefilled(model, seqs: list[list[int]], graphs: bool):  # type: ignore[no-untyped-def]
    """A runner with every prompt prefilled in one pass, their block tables, its logits."""
    cache = KVCache(CacheShape.of(model), num_blocks=64, device=torch.device("cuda"))
    runner = ModelRunner(model, cache, max_len=256, eager=not graphs)
    runner.capture_graphs(len(PROMPTS))
    blocks = BlockManager(64, cache.block_size)
    tables = [BlockTable() for _ in PROMPTS]
    for table, n in zip(tables, PROMPTS, strict=True):
        blocks.allocate(table, n + STEPS)
    logits = runner.forward(
        [SeqInput(s[:n], 0, t.blocks) for s, n, t in zip(seqs, PROMPTS, tables, strict=True)]
    )
    return runner, tables, logits


def test_prefill_matches(model, forced) -> None:  # type: ignore[no-untyped-def]
    seqs, refs = forced
    _, _, logits = _prefilled(model, seqs, graphs=False)
    for i, n in enumerate(PROMPTS):
        assert _close(logits[i], refs[i][n - 1]) < 1e-3


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_decode_matches(model, forced, graphs: bool) -> None:  # type: ignore[no-untyped-def]
    seqs, refs = forced
    runner, tables, _ = _prefilled(model, seqs, graphs)
    errors: list[list[float]] = [[] for _ in PROMPTS]
    for step in range(STEPS):
        tokens = torch.tensor(
            [s[n + step] for s, n in zip(seqs, PROMPTS, strict=True)], device="cuda"
        )
        inputs = [SeqInput([], n + step, t.blocks) for n, t in zip(PROMPTS, tables, strict=True)]
        logits = runner.decode(tokens, inputs)
        for i, n in enumerate(PROMPTS):
            errors[i].append(_close(logits[i], refs[i][n + step]))
    for i, e in enumerate(errors):
        assert max(e) < 1e-3, (i, [round(x, 4) for x in e])


async def _greedy(engine: PagedEngine, i: int, prompt: str, new_tokens: int) -> str:
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


async def test_engine_greedy_equals_generate(model) -> None:  # type: ignore[no-untyped-def]
    """The whole paged engine (prompts prefilled together, the compiled decode step replayed
    from CUDA graphs, several steps a launch, four jobs sharing the batch) gives the same
    greedy tokens as transformers' generate() on the same weights."""
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
    engine = PagedEngine(model, tokenizer, num_blocks=256, max_seqs=4, max_len=512)
    try:
        got = await asyncio.gather(
            *(_greedy(engine, i, p, new_tokens) for i, p in enumerate(prompts))
        )
    finally:
        engine.close()
    for want, have in zip(refs, got, strict=True):
        assert have.split() == want.split()
