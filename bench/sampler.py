"""The batch sampler's time a step on this machine's CPU: 8 rows of SmolLM2's 49,152
logits at temperature 1, at the model's own defaults (temperature 0.2, top_p 0.9), and
greedy; the host path (host_sampling.py) against the device path run on the CPU.

    python bench/sampler.py
"""

from __future__ import annotations

import time

import torch

from tokenrelay.queueing.messages import SamplingParams
from tokenrelay.workers.sampling import BatchSampler

ROWS, VOCAB = 8, 49152
CASES = {
    "temperature 1": SamplingParams(temperature=1.0),
    "temperature 0.2, top_p 0.9": SamplingParams(temperature=0.2, top_p=0.9),
    "greedy": SamplingParams(temperature=0),
}


def median_ms(sampler: BatchSampler, logits: torch.Tensor, n: int = 21) -> float:
    sampler(logits)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        sampler(logits)
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def main() -> None:
    logits = torch.randn(ROWS, VOCAB) * 3
    shared = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    for name, params in CASES.items():
        row = [params] * ROWS
        host = median_ms(BatchSampler(row, [None] * ROWS, shared, cpu, host=True), logits)
        device = median_ms(BatchSampler(row, [None] * ROWS, shared, cpu, host=False), logits)
        print(f"{name:28s} host path {host:6.2f} ms   device path {device:6.2f} ms")


if __name__ == "__main__":
    main()
