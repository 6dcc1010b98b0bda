"""Where a decode step's time goes, kernel by kernel, and what the GEMMs alone can do.

On the GPU machine (bench/gpu_run.sh breakdown): builds random:8b with the paged engine at
a user's defaults, then for each batch size profiles graph replays of the decode step
(kernels grouped: GEMM, attention, fused pointwise, other) and the sampler; then times the
step's GEMM shapes alone (separate q/k/v and gate/up against fused ones) in CUDA graphs.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from tokenrelay.bench.models import random_llama, synthetic_tokenizer
from tokenrelay.bench.steps import warm_batch
from tokenrelay.queueing.messages import SamplingParams
from tokenrelay.workers.paged.build import build_paged_engine
from tokenrelay.workers.sampling import sample_rows


def category(name: str) -> str:
    low = name.lower()
    if "paged" in low or "attention" in low or "_attn" in low:
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "sm90", "gemv", "matmul")):
        return "gemm"
    if low.startswith("triton"):
        return "fused (triton)"
    return "other"


def profile_step(engine, batch: int, context: int, iters: int) -> dict:
    tables, seqs, tokens = warm_batch(engine, batch, context)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            engine.runner.decode(tokens, seqs)
        torch.cuda.synchronize()
    kernels: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    span = [float("inf"), 0.0]
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kernels[ev.name] += ev.device_time
        counts[ev.name] += 1
        span[0] = min(span[0], ev.time_range.start)
        span[1] = max(span[1], ev.time_range.end)
    groups: collections.Counter[str] = collections.Counter()
    for name, t in kernels.items():
        groups[category(name)] += t
    busy = sum(kernels.values()) / iters
    wall = (span[1] - span[0]) / iters
    top = [
        (name[:90], round(t / iters, 1), counts[name] // iters)
        for name, t in kernels.most_common(14)
    ]
    # the sampler, as the engine runs it after each step (temperature 1, top_p 1)
    logits = torch.randn(batch, engine.runner.model.config.vocab_size, device=engine.device)
    params = [SamplingParams(temperature=1.0)] * batch
    gens = [None] * batch
    for _ in range(3):
        sample_rows(logits, params, gens, engine._shared)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        sample_rows(logits, params, gens, engine._shared)
    torch.cuda.synchronize()
    sample_ms = (time.perf_counter() - t0) / iters * 1e3
    for table in tables:
        engine.blocks.free(table)
    return {
        "batch": batch,
        "step_us_wall": round(wall, 1),
        "kernel_us_busy": round(busy, 1),
        "kernels_per_step": sum(counts.values()) // iters,
        "groups_us": {k: round(v / iters, 1) for k, v in groups.most_common()},
        "top": top,
        "kernels": [
            (name[:90], round(t / iters, 1), counts[name] // iters)
            for name, t in kernels.most_common()
        ],
        "sample_ms_host_timed": round(sample_ms, 3),
    }


def time_graph(fn, reps: int = 20) -> float:
    """Microseconds per call of ``fn`` replayed in a CUDA graph of ``reps`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (10 * reps)


def gemm_table(batches: list[int]) -> list[dict]:
    """A layer's GEMMs of the 8B shape, separate and fused, at each batch size. Each weight
    set is 40 copies so that every call reads from HBM, not L2."""
    dev = torch.device("cuda")
    h, q, kv, inter, vocab = 4096, 4096, 1024, 14336, 128256
    shapes = {
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "qkv": (q + 2 * kv, h),
        "o": (h, q),
        "gate": (inter, h),
        "up": (inter, h),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (vocab, h),
    }
    copies = {name: (2 if name == "lm_head" else 8) for name in shapes}
    rows = []
    for batch in batches:
        row = {"batch": batch}
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(copies[name])]
            x = torch.randn(batch, k, device=dev, dtype=torch.bfloat16)
            it = iter(range(10**9))

            def call(ws=ws, x=x, it=it) -> None:
                torch.nn.functional.linear(x, ws[next(it) % len(ws)])

            us = time_graph(call, reps=len(ws) * 2)
            tb = n * k * 2 / (us * 1e-6) / 1e12
            row[name] = {"us": round(us, 1), "TB/s": round(tb, 2)}
            del ws
        sep = sum(row[k]["us"] for k in ("q", "k", "v", "o", "gate", "up", "down"))
        fused = sum(row[k]["us"] for k in ("qkv", "o", "gate_up", "down"))
        row["layer_separate_us"] = round(sep, 1)
        row["layer_fused_us"] = round(fused, 1)
        row["model_separate_ms"] = round((sep * 32 + row["lm_head"]["us"]) / 1e3, 3)
        row["model_fused_ms"] = round((fused * 32 + row["lm_head"]["us"]) / 1e3, 3)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="breakdown.json")
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM-alone table")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    result: dict = {"gemm": [] if args.no_gemm else gemm_table(batches)}
    print(json.dumps(result["gemm"], indent=1), flush=True)
    t0 = time.time()
    model = random_llama("8b", "cuda", torch.bfloat16)
    engine = build_paged_engine(model, synthetic_tokenizer(), max_model_len=None, max_seqs=None)
    print(f"engine ready in {time.time() - t0:.0f} s", flush=True)
    result["steps"] = [profile_step(engine, b, args.context, args.iters) for b in batches]
    print(json.dumps(result["steps"], indent=1), flush=True)
    engine.close()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
