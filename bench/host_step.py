"""The engine thread's host work for one launch of decode steps, without a model: the
paged engine's token-to-text-and-events path (``_finish_step``) over B sequences.

    python bench/host_step.py --batch 256 --steps 4

At hundreds of sequences this host work, not the GPU, set the stack's pace (BENCHMARKS.md,
"Where the engine thread's time goes"); this times it on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time

import torch

from tokenrelay.bench.models import synthetic_tokenizer
from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.workers.engine import JobHandle
from tokenrelay.workers.paged.blocks import BlockManager
from tokenrelay.workers.paged.clock import LoopClock
from tokenrelay.workers.paged.engine import PagedEngine
from tokenrelay.workers.paged.output import fast_decoder
from tokenrelay.workers.paged.sequences import Step


def host_engine(tokenizer: object, max_seqs: int) -> PagedEngine:
    """A PagedEngine with its host-side state only (no model, no cache, no thread)."""
    engine = object.__new__(PagedEngine)
    engine.tokenizer = tokenizer  # type: ignore[assignment]
    engine._decode = fast_decoder(tokenizer) or engine._decode  # type: ignore[arg-type,method-assign]
    engine.eos_ids = set()
    engine.max_context = 1 << 20
    engine.max_seqs = max_seqs
    engine.device = torch.device("cpu")
    engine.blocks = BlockManager(max_seqs * 64, 16)
    engine.clock = LoopClock()
    return engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="decode steps a launch")
    parser.add_argument("--launches", type=int, default=50)
    args = parser.parse_args()
    tokenizer = synthetic_tokenizer()
    engine = host_engine(tokenizer, args.batch)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    runs = []
    for i in range(args.batch):
        job = Job(
            id=f"j{i}",
            model="m",
            kind="completion",
            prompt="w1 w2 w3",
            stream=True,
            created=0,
            deadline=time.time() + 3600,
            params=SamplingParams(max_tokens=1 << 16, ignore_eos=True),
        )
        run = engine._prepare_or_reject(job, JobHandle(job.id, loop))
        assert run is not None
        runs.append(run)
    live = [(r, s) for r in runs for s in r.seqs]
    rng = random.Random(0)
    total = 0.0
    for _ in range(args.launches):
        picked = torch.tensor(
            [[rng.randrange(100, 100000) for _ in live] for _ in range(args.steps)]
        )
        step = Step(live, picked)
        t0 = time.perf_counter()
        engine._finish_step(step)
        total += time.perf_counter() - t0
    per_launch = total / args.launches * 1e3
    print(
        f"batch {args.batch}, {args.steps} steps a launch: {per_launch:.2f} ms a launch, "
        f"{per_launch / args.steps:.2f} ms a step, "
        f"{per_launch / args.steps / args.batch * 1e3:.1f} us a token"
    )
    loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main()
