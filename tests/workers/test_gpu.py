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
