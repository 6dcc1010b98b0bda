"""Paged attention kernel (workers/paged/triton_attention.py) on the GPU: correctness
against the float32 torch reference, then time against the floor.

    PYTHONUNBUFFERED=1 python3 bench/paged_attention.py 2>&1 | tee $OUT/log.txt
    TRITON_INTERPRET=1 python bench/paged_attention.py --smoke   # the script's logic, on CPU

Notes and results: bench/paged_attention_notes.md.

Decode floor: live KV bytes (sum of seq_lens x KVH x D x 2 x dtype size) plus q and out,
over the copy bandwidth measured first. Prefill is compared with torch SDPA (flash) on
contiguous tensors with K/V expanded to all heads. Timings: CUDA-graph replays of
several calls over distinct caches (so the KV is not L2-resident), median of do_bench.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.paged.triton_attention import (
    Config,
    choose_config,
    paged_attention,
    reference_attention,
)

SMOKE = False
DEV = "cuda"


def make_batch(
    ctx_lens: list[int],
    q_lens: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    copies: int = 1,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]], torch.Tensor, torch.Tensor]:
    """Random q, `copies` random caches each with its own shuffled block table, seq_lens,
    query_start."""
    need = [math.ceil(c / block_size) for c in ctx_lens]
    num_blocks = sum(need) + 2
    max_blocks = max(need) + 1
    caches = []
    for _ in range(copies):
        shape = (num_blocks, block_size, kv_heads, dim)
        k = torch.randn(shape, device=DEV, dtype=dtype, generator=gen)
        v = torch.randn(shape, device=DEV, dtype=dtype, generator=gen)
        ids = torch.randperm(num_blocks, device=DEV, generator=gen).to(torch.int32)
        table = torch.randint(
            0, num_blocks, (len(ctx_lens), max_blocks), device=DEV, generator=gen
        ).to(torch.int32)
        offsets = [0, *torch.tensor(need).cumsum(0).tolist()]
        for s, n in enumerate(need):
            table[s, :n] = ids[offsets[s] : offsets[s] + n]
        caches.append((k, v, table))
    q = torch.randn(sum(q_lens), heads, dim, device=DEV, dtype=dtype, generator=gen)
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, caches, seq_lens, starts.to(DEV)


# ---------------------------------------------------------------- correctness

CHECKS = [
    # name, ctx lens, q lens, H, KVH, D, block, dtype, kwargs
    ("decode bf16 llama", [384, 1000, 17, 0, 4096], [1] * 5, 32, 8, 128, 16, "bfloat16", {}),
    ("decode fp16 split", [32768, 5], [1, 1], 32, 8, 128, 16, "float16", {}),
    ("decode fp32", [300, 77, 1], [1] * 3, 8, 2, 64, 16, "float32", {}),
    ("decode d256 softcap window", [900, 4000], [1, 1], 16, 8, 256, 16, "bfloat16",
     {"softcap": 50.0, "sliding_window": 512}),
    ("decode d80 mha", [200, 513], [1, 1], 8, 8, 80, 32, "bfloat16", {}),
    ("decode d96 mqa", [129, 600], [1, 1], 16, 1, 96, 16, "bfloat16", {}),
    ("spec decode 3 tokens", [100, 2000, 45], [3, 3, 2], 32, 8, 128, 16, "bfloat16", {}),
    ("prefill bf16", [512, 300, 1], [512, 300, 1], 32, 8, 128, 16, "bfloat16", {}),
    ("chunked prefill + decode", [1500, 700, 90, 0], [256, 1, 90, 1], 32, 8, 128, 16,
     "bfloat16", {}),
    ("prefill fp32 window softcap", [400, 130], [400, 50], 8, 4, 64, 16, "float32",
     {"sliding_window": 100, "softcap": 30.0}),
    ("prefill d256 gemma2", [700, 64], [700, 64], 8, 4, 256, 16, "bfloat16",
     {"sliding_window": 256, "softcap": 50.0}),
    ("prefill d96 gqa 6", [333, 21], [333, 21], 12, 2, 96, 16, "bfloat16", {}),
]  # fmt: skip

TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 1.5e-2}


def check_all(gen: torch.Generator) -> bool:
    ok = True
    for name, ctx, qls, h, kvh, d, bs, dt, kw in CHECKS:
        if SMOKE:
            ctx = [min(c, 40) for c in ctx]
            qls = [min(q, c) if c else q for q, c in zip(qls, ctx, strict=True)]
        if SMOKE and dt == "bfloat16":
            dt = "float16"  # the interpreter's bf16 tl.dot is wrong (see the CPU test)
        dtype = getattr(torch, dt)
        q, caches, seq_lens, starts = make_batch(ctx, qls, h, kvh, d, bs, dtype, gen)
        k, v, table = caches[0]
        # q as the engine passes it: a transposed view, rows not contiguous
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        args = (q, k, v, table, seq_lens, starts, d**-0.5)
        ref = reference_attention(*args, **kw)
        rows = torch.cat(
            [torch.arange(starts[s], starts[s + 1]) for s in range(len(ctx)) if ctx[s] > 0]
        )
        configs: list[Config | None] = [None]
        if max(qls) == 1:  # also force split-KV on and off
            configs += [Config(16, 64, 8, 4, 3), Config(16, 64, 1, 4, 3)]
        for cfg in configs:
            out = torch.full_like(q, float("nan"))
            paged_attention(
                *args, max_query_len=max(qls), max_seq_len=max(ctx), out=out, config=cfg, **kw
            )
            err = ((out.float() - ref)[rows].norm() / ref[rows].norm()).item()
            unwritten = out.isnan().any().item()
            good = err < TOL[dt] and not unwritten
            ok &= good
            tag = "default" if cfg is None else f"seg={cfg.num_seg}"
            print(f"{'ok  ' if good else 'FAIL'} {name:32s} {tag:8s} rel err {err:.2e}"
                  f"{' UNWRITTEN' if unwritten else ''}")  # fmt: skip
    return ok & check_graph(gen)


def check_graph(gen: torch.Generator) -> bool:
    """Capture a split-KV decode step in a CUDA graph, change the lengths in place, replay."""
    if SMOKE:
        return True
    ctx = [3000, 100, 700, 1]
    q, caches, seq_lens, starts = make_batch(ctx, [1] * 4, 32, 8, 128, 16, torch.bfloat16, gen)
    k, v, table = caches[0]
    args = (q, k, v, table, seq_lens, starts, 128**-0.5)
    out = torch.empty_like(q)
    kw = {"max_query_len": 1, "max_seq_len": 4096, "out": out}
    paged_attention(*args, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention(*args, **kw)
    seq_lens.copy_(torch.tensor([2999, 1500, 701, 2], dtype=torch.int32))
    q.normal_(generator=gen)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_attention(*args)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    good = err < TOL["bfloat16"]
    print(f"{'ok  ' if good else 'FAIL'} {'cuda graph replay, new lengths':41s} rel err {err:.2e}")
    return good


# ---------------------------------------------------------------- timing


def bench(fn: Callable[[], object]) -> float:
    """Median seconds of one call of fn."""
    if SMOKE:
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def graphed(calls: list[Callable[[], object]]) -> Callable[[], object]:
    if SMOKE:
        return lambda: [c() for c in calls]
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return graph.replay


def copy_bandwidth() -> float:
    if SMOKE:
        return 4.22e12
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / t


DECODE = [  # name, ctx lens (one decode token each)
    ("b1 ctx384", [384]),
    ("b1 ctx32768", [32768]),
    ("b64 ctx384", [384] * 64),
    ("b256 ctx384", [384] * 256),
    ("b64 ctx4096", [4096] * 64),
    ("b256 mixed 128..4096", None),
]

DECODE_CONFIGS = [  # tile, warps, stages
    (32, 2, 3),
    (64, 4, 2),
    (64, 4, 3),
    (64, 4, 4),
    (128, 4, 3),
    (64, 8, 3),
    (128, 8, 3),
]

SEGMENTS = [1, 2, 4, 8, 16, 32, 64]

H, KVH, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16  # the smoke run swaps in float16 (interpreter)


def decode_case(name: str, ctx: list[int], bw: float, gen: torch.Generator, sweep: bool) -> str:
    if SMOKE:
        ctx = [max(c // 64, 2) for c in ctx[:8]]
    nbytes = sum(ctx) * KVH * D * 2 * DTYPE.itemsize + 2 * len(ctx) * H * D * DTYPE.itemsize
    copies = max(1, min(16, math.ceil(300e6 / nbytes)))
    q, caches, seq_lens, starts = make_batch(ctx, [1] * len(ctx), H, KVH, D, BS, DTYPE, gen, copies)
    out = torch.empty_like(q)
    floor = nbytes / bw
    default = choose_config(len(ctx), KVH, H // KVH, D, 1, max(ctx), q.device)

    def run(cfg: Config | None) -> float:
        calls = [
            lambda k=k, v=v, t=t: paged_attention(
                q, k, v, t, seq_lens, starts, D**-0.5, max_query_len=1,
                max_seq_len=max(ctx), out=out, config=cfg,
            )
            for k, v, t in caches
        ]  # fmt: skip
        return bench(graphed(calls)) / copies

    t_default = run(None)
    best = (t_default, default)

    def consider(cfg: Config) -> None:
        nonlocal best
        try:
            t = run(cfg)
        except Exception as e:  # a config that does not fit: skip it
            print(f"  {name} {cfg}: {type(e).__name__}")
            return
        print(f"  {name:22s} tile={cfg.tile:3d} w={cfg.num_warps} st={cfg.num_stages} "
              f"seg={cfg.num_seg:2d} {t * 1e6:8.1f} us  {t / floor:5.2f}x floor")  # fmt: skip
        if t < best[0]:
            best = (t, cfg)

    if sweep:  # the launch shape at the default split, then the split at the best shape
        for tile, warps, stages in DECODE_CONFIGS:
            consider(Config(16, tile, default.num_seg, warps, stages))
        b = best[1]
        for seg in SEGMENTS if len(ctx) * KVH < 1024 else [1, 2]:
            if seg != b.num_seg:
                consider(Config(16, b.tile, seg, b.num_warps, b.num_stages))
    c = best[1]
    line = (
        f"{name:22s} {nbytes / 1e6:9.1f} MB floor {floor * 1e6:8.1f} us | default "
        f"(seg={default.num_seg}) {t_default * 1e6:8.1f} us {t_default / floor:5.2f}x | best "
        f"{best[0] * 1e6:8.1f} us {best[0] / floor:5.2f}x (tile={c.tile} w={c.num_warps} "
        f"st={c.num_stages} seg={c.num_seg})"
    )
    print("=>", line)
    return line


def time_decode(bw: float, gen: torch.Generator, sweep: bool) -> list[str]:
    mixed = torch.randint(128, 4097, (256,), generator=torch.Generator().manual_seed(1))
    return [decode_case(name, ctx or mixed.tolist(), bw, gen, sweep) for name, ctx in DECODE]


PREFILL = [("4 x 512 new", [512] * 4), ("1 x 8192 new", [8192])]
PREFILL_CONFIGS = [  # block_m, tile, warps, stages
    (128, 64, 8, 2),
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 32, 4, 3),
    (256, 64, 8, 2),
]


def prefill_case(name: str, lens: list[int], gen: torch.Generator, sweep: bool) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if SMOKE:
        lens = [c // 64 for c in lens]
    q, caches, seq_lens, starts = make_batch(lens, lens, H, KVH, D, BS, DTYPE, gen)
    k, v, table = caches[0]
    out = torch.empty_like(q)
    flops = 4 * sum(n * (n + 1) / 2 for n in lens) * H * D

    def run(cfg: Config | None) -> float:
        fn = graphed([lambda: paged_attention(
            q, k, v, table, seq_lens, starts, D**-0.5, max_query_len=max(lens),
            max_seq_len=max(lens), out=out, config=cfg,
        )])  # fmt: skip
        return bench(fn)

    t_default = run(None)
    best_t, best_c = t_default, None
    for bm, tile, warps, stages in PREFILL_CONFIGS if sweep else []:
        cfg = Config(bm, tile, 1, warps, stages)
        try:
            t = run(cfg)
        except Exception as e:  # a config that does not fit: skip it
            print(f"  {name} {cfg}: {type(e).__name__}")
            continue
        print(f"  {name:14s} bm={bm} tile={tile} w={warps} st={stages}"
              f" {t * 1e6:8.1f} us {flops / t / 1e12:6.1f} TFLOP/s")  # fmt: skip
        if t < best_t:
            best_t, best_c = t, cfg
    # SDPA flash on contiguous (B, H, L, D) tensors, K/V expanded to all heads
    qs, ks, vs = (
        torch.randn(len(lens), H, lens[0], D, device=DEV, dtype=DTYPE, generator=gen)
        for _ in range(3)
    )
    backend = SDPBackend.MATH if SMOKE else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(backend):
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
    line = (
        f"{name:14s} {flops / 1e9:7.1f} GFLOP | default {t_default * 1e6:8.1f} us "
        f"{flops / t_default / 1e12:6.1f} TFLOP/s | best {best_t * 1e6:8.1f} us ({best_c}) | "
        f"sdpa flash {t_sdpa * 1e6:8.1f} us {flops / t_sdpa / 1e12:6.1f} TFLOP/s | "
        f"ours/sdpa {t_default / t_sdpa:5.2f}x"
    )
    print("=>", line)
    return line


def time_prefill(gen: torch.Generator, sweep: bool) -> list[str]:
    return [prefill_case(name, lens, gen, sweep) for name, lens in PREFILL]


def main() -> None:
    global SMOKE, DEV
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--no-sweep", action="store_true", help="time the default configs only")
    args = parser.parse_args()
    SMOKE = args.smoke
    DEV = "cpu" if SMOKE else "cuda"
    if SMOKE:
        global DTYPE
        DTYPE = torch.float16
    gen = torch.Generator(device=DEV).manual_seed(0)
    if not SMOKE:
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    ok = check_all(gen)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (bytes read + written)")
    decode = time_decode(bw, gen, sweep=not args.no_sweep)
    prefill = time_prefill(gen, sweep=not args.no_sweep)
    print("\n== decode (Llama-3-8B attention: H=32 KVH=8 D=128 bf16, block 16) ==")
    print("\n".join(decode))
    print("== prefill ==")
    print("\n".join(prefill))
    print("correctness:", "all ok" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
