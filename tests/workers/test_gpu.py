"""On a CUDA GPU: the batch engine's CUDA-graph decode computes transformers' logits.

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_matches_transformers(dtype: torch.dtype) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_llama("1b", "cuda", dtype)
    runner = LlamaRunner(model, slots=4, max_len=256)
    assert runner.use_graphs
    g = torch.Generator(device="cpu").manual_seed(0)
    seqs = [torch.randint(0, 128000, (n + 24,), generator=g).tolist() for n in (17, 40, 64)]
    prompt_lens = [17, 40, 64]
    with torch.inference_mode():
        refs = [model(torch.tensor([s], device="cuda")).logits[0].float() for s in seqs]
    ours: list[list[torch.Tensor]] = [
        [runner.prefill(slot, s[:n])]
        for slot, (s, n) in enumerate(zip(seqs, prompt_lens, strict=True))
    ]
    for step in range(24):
        tokens = torch.tensor(
            [s[n + step] for s, n in zip(seqs, prompt_lens, strict=True)], device="cuda"
        )
        positions = torch.tensor([n + step for n in prompt_lens], device="cuda")
        logits = runner.decode(tokens, positions)
        for i in range(3):
            ours[i].append(logits[i])
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for ref, got, n in zip(refs, ours, prompt_lens, strict=True):
        got_t = torch.stack(got[:-1])  # logits predicting positions n .. n+23
        want = ref[n - 1 : n + 23]
        error = (got_t - want).norm() / want.norm()
        assert error < tolerance, float(error)
        agree = (got_t.argmax(-1) == want.argmax(-1)).float().mean()
        assert agree >= (0.95 if dtype == torch.float32 else 0.6)
