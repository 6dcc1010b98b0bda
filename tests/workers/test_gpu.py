"""On a CUDA GPU: the batch engine's CUDA-graph decode gives transformers' greedy tokens."""

from __future__ import annotations

import pytest
import torch

from tokenrelay.bench.models import random_llama
from tokenrelay.workers.llama_runner import LlamaRunner

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", ["1b"])
def test_cuda_graph_greedy_equals_transformers(shape: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = random_llama(shape, "cuda", torch.float32)
    runner = LlamaRunner(model, slots=4, max_len=256)
    assert runner.use_graphs
    g = torch.Generator(device="cpu").manual_seed(0)
    prompts = [torch.randint(0, 128000, (n,), generator=g).tolist() for n in (17, 40, 64)]
    refs = []
    for p in prompts:
        out = model.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False, min_new_tokens=24
        )
        refs.append(out[0, len(p) :].tolist())
    seqs = [[int(runner.prefill(slot, p).argmax())] for slot, p in enumerate(prompts)]
    for _ in range(23):
        tokens = torch.tensor([s[-1] for s in seqs], device="cuda")
        positions = torch.tensor(
            [len(p) + len(s) - 1 for p, s in zip(prompts, seqs, strict=True)], device="cuda"
        )
        logits = runner.decode(tokens, positions)
        for i, s in enumerate(seqs):
            s.append(int(logits[i].argmax()))
    for ref, got in zip(refs, seqs, strict=True):
        assert got == ref
