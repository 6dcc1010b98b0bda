"""The paged decode kernel against FlexAttention on the same paged cache, side by side.

    python3 bench/flex_decode.py            # on the GPU machine (bench/gpu_run.sh py ...)
    python bench/flex_decode.py --smoke     # tiny shapes on CPU: the two agree

FlexAttention (torch.nn.attention.flex_attention, compiled) reads the engine's own cache
layout: keys and values as one (1, KV heads, blocks x 16, D) sequence, a BlockMask whose
KV block is the page (16 tokens) and whose rows list each sequence's pages from its block
table, as torch's experimental PagedAttention does, all pages but the last marked full and
the last masked by position. Both are timed in CUDA graphs over several distinct caches,
so the KV comes from HBM, next to the floor (live KV bytes over the copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.paged.triton_attention import reference_attention

BLOCK = 16
# name, batch, context: the engine's decode shapes (Llama 3 8B: 32 heads, 8 KV heads, D 128)
CASES = [
    ("b1 ctx 256", 1, 256),
    ("b1 ctx 32768", 1, 32768),
    ("b64 ctx 256", 64, 256),
    ("b64 ctx 4096", 64, 4096),
    ("b256 ctx 256", 256, 256),
    ("b256 ctx 2048", 256, 2048),
]


def paged_case(batch: int, ctx: int, heads: int, kv_heads: int, dim: int, dtype, dev, copies: int):  # type: ignore[no-untyped-def]
    pages = -(-ctx // BLOCK)
    num_blocks = batch * pages + 1
    caches = []
    for _ in range(copies):
        k = torch.randn(num_blocks, BLOCK, kv_heads, dim, device=dev, dtype=dtype)
        v = torch.randn(num_blocks, BLOCK, kv_heads, dim, device=dev, dtype=dtype)
        table = torch.randperm(num_blocks - 1, device=dev)[: batch * pages]
        caches.append((k, v, table.view(batch, pages).to(torch.int32)))
    q = torch.randn(batch, heads, dim, device=dev, dtype=dtype)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    return q, caches, seq_lens


def block_mask_for(table: torch.Tensor, seq_lens: torch.Tensor, num_slots: int) -> BlockMask:
    """Each sequence (batch row) sees its own pages: all but the last full, the last up to
    its length."""
    batch, width = table.shape
    n_pages = num_slots // BLOCK  # index rows span every physical page, as PagedAttention's
    pages = (seq_lens + BLOCK - 1) // BLOCK
    last = (seq_lens - 1) % BLOCK  # the last page's last position
    cols = torch.arange(n_pages, device=table.device)
    full_idx = torch.zeros(batch, n_pages, dtype=torch.int32, device=table.device)
    full_idx[:, :width] = table
    partial_idx = torch.zeros_like(full_idx)
    partial_idx[:, 0] = torch.gather(table, 1, (pages - 1).long()[:, None])[:, 0]

    def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        return kv_idx % BLOCK <= last[b]

    return BlockMask.from_kv_blocks(
        torch.ones(batch, 1, 1, dtype=torch.int32, device=table.device),
        partial_idx.contiguous()[:, None, None].to(torch.int32),
        (pages - 1).to(torch.int32)[:, None, None],
        full_idx.masked_fill(cols[None] >= (pages - 1)[:, None], 0)[:, None, None].to(torch.int32),
        BLOCK_SIZE=(128, BLOCK),  # one row of query blocks (q_len 1); the KV block is a page
        mask_mod=mask_mod,
        seq_lengths=(1, num_slots),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    heads, kv_heads, dim = (8, 2, 32) if args.smoke else (32, 8, 128)
    cases = [("smoke", 3, 40)] if args.smoke else CASES
    flex = torch.compile(flex_attention, dynamic=False)
    if not args.smoke:
        from workers.paged.triton_attention import paged_attention

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from paged_attention import bench, copy_bandwidth, graphed

        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for name, batch, ctx in cases:
        kv_bytes = batch * ctx * kv_heads * dim * 2 * (2 if dtype != torch.float32 else 4)
        copies = 1 if args.smoke else max(2, min(16, int(2e9 // max(kv_bytes, 1))))
        q, caches, seq_lens = paged_case(batch, ctx, heads, kv_heads, dim, dtype, dev, copies)
        starts = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        calls_flex, calls_ours = [], []
        for k, v, table in caches:
            num_slots = k.shape[0] * BLOCK
            kf = k.view(1, num_slots, kv_heads, dim).transpose(1, 2)
            vf = v.view(1, num_slots, kv_heads, dim).transpose(1, 2)
            mask = block_mask_for(table, seq_lens, num_slots)
            qf = q.view(batch, 1, heads, dim).transpose(1, 2)  # (B, H, 1, D)

            def run_flex(qf=qf, kf=kf, vf=vf, mask=mask):  # type: ignore[no-untyped-def]
                return flex(qf, kf, vf, block_mask=mask, enable_gqa=True, scale=dim**-0.5)

            calls_flex.append(run_flex)
            if not args.smoke:

                def run_ours(k=k, v=v, table=table, q=q, lens=seq_lens, starts=starts, ctx=ctx):  # type: ignore[no-untyped-def]
                    return paged_attention(
                        q, k, v, table, lens, starts, dim**-0.5, max_query_len=1, max_seq_len=ctx
                    )

                calls_ours.append(run_ours)
        k, v, table = caches[0]
        ref = reference_attention(q, k, v, table, seq_lens, starts, dim**-0.5)
        try:
            got = calls_flex[0]().transpose(1, 2).reshape(batch, heads, dim).float()
            err = ((got - ref).norm() / ref.norm()).item()
            row: dict[str, object] = {"case": name, "flex_rel_err": float(f"{err:.2e}")}
        except Exception as exc:  # report and go on
            err, calls_flex = 0.0, []
            row = {"case": name, "flex": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}
        if not args.smoke:
            ours = calls_ours[0]().float()
            row["ours_rel_err"] = float(f"{((ours - ref).norm() / ref.norm()).item():.2e}")
            floor_us = kv_bytes / bw * 1e6
            row["floor_us"] = round(floor_us, 1)
            for label, calls in (("ours_us", calls_ours), ("flex_us", calls_flex)):
                if not calls:
                    continue
                try:
                    us = bench(graphed(calls)) / len(calls) * 1e6
                    row[label] = round(us, 1)
                    row[label.replace("_us", "_x_floor")] = round(us / floor_us, 2)
                except Exception as exc:  # report and go on
                    row[label] = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), f"{name}: flex disagrees ({err})"
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
