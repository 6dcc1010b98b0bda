"""The decode step alone, against its floor: one CUDA graph replay of the paged engine's
runner at each batch size, timed with events, next to (weights + live KV) / bandwidth."""

from __future__ import annotations

import torch

from tokenrelay.workers.paged.blocks import BlockTable
from tokenrelay.workers.paged.engine import PagedEngine
from tokenrelay.workers.paged.runner import SeqInput


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def warm_batch(
    engine: PagedEngine, batch: int, context: int
) -> tuple[list[BlockTable], list[SeqInput], torch.Tensor]:
    """``batch`` sequences of ``context`` cached tokens (blocks taken from the engine's
    manager: free them after), their next tokens, three decode steps run."""
    tables = [BlockTable() for _ in range(batch)]
    for table in tables:
        engine.blocks.allocate(table, context + 1)
    seqs = [SeqInput([], context, t.blocks) for t in tables]
    tokens = torch.randint(0, 1000, (batch,), device=engine.device)
    for _ in range(3):
        engine.runner.decode(tokens, seqs)
    return tables, seqs, tokens


def step_profile(
    engine: PagedEngine, batches: list[int], context: int, bandwidth: float, iters: int = 20
) -> list[dict[str, object]]:
    """Rows of batch, step ms, floor ms and their ratio; the engine must be idle."""
    weights = weight_bytes(engine.runner.model)
    per_token = engine.cache.shape.bytes_per_token
    rows = []
    for batch in batches:
        if batch > engine.max_seqs:
            continue
        tables, seqs, tokens = warm_batch(engine, batch, context)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            engine.runner.decode(tokens, seqs)
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / iters
        floor_ms = (weights + batch * (context + 1) * per_token) / bandwidth * 1e3
        rows.append(
            {
                "batch": batch,
                "context": context,
                "step_ms": round(step_ms, 3),
                "floor_ms": round(floor_ms, 3),
                "ratio": round(step_ms / floor_ms, 2),
                "tok_s_at_step": round(batch / step_ms * 1e3, 1),
            }
        )
        for table in tables:
            engine.blocks.free(table)
    return rows
