"""The CPU kernels behind --low-bit, timed over a whole model's linears (SmolLM2-135M's
shapes by default: 30 layers of fused qkv, o, gate_up and down, plus the LM head), so the
weights stream from memory as they do in a decode step rather than sitting in the cache.

    python bench/cpu_lowbit_kernels.py [--batch 1,8] [--repeats 7] [--json OUT]

Prints, per format and batch, the best time of one pass over all linears, the weight bytes
it read and the rate. Formats are timed in turns (one pass of each, then again), so a busy
machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenrelay.workers.lowbit.formats import FORMATS
from tokenrelay.workers.lowbit.linear import quantize_weight

SMOLLM2 = {
    "hidden": 576,
    "intermediate": 1536,
    "heads": 9,
    "kv_heads": 3,
    "layers": 30,
    "vocab": 49152,
}


def shapes(cfg: dict[str, int]) -> list[tuple[int, int]]:
    h, i, d = cfg["hidden"], cfg["intermediate"], cfg["hidden"] // cfg["heads"]
    qkv = h + 2 * cfg["kv_heads"] * d
    layer = [(qkv, h), (h, h), (2 * i, h), (h, i)]
    return layer * cfg["layers"] + [(cfg["vocab"], h)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--formats", default="float32,bf16,sym_int8,sym_int4,asym_int4")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = [torch.randn(n, k) / k**0.5 for n, k in shapes(SMOLLM2)]
    names = args.formats.split(",")
    layers = {}
    for name in names:
        layers[name] = [quantize_weight(w, name) for w in dense]
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        xs = {k: torch.randn(batch, k) for k in {w.shape[1] for w in dense}}
        best = dict.fromkeys(names, float("inf"))
        for _ in range(args.repeats):
            for name in names:
                start = time.perf_counter()
                for q, w in zip(layers[name], dense, strict=True):
                    q(xs[w.shape[1]])
                best[name] = min(best[name], time.perf_counter() - start)
        for name in names:
            nbytes = sum(q.weight_bytes() for q in layers[name])
            row = {
                "format": name,
                "batch": batch,
                "ms": round(best[name] * 1e3, 2),
                "weight_mb": round(nbytes / 1e6, 1),
                "gb_s": round(nbytes / best[name] / 1e9, 2),
            }
            results.append(row)
            what = FORMATS[name].summary if name in FORMATS else "float32"
            print(
                f"batch {batch:3d}  {name:10s} {row['ms']:8.2f} ms  {row['weight_mb']:7.1f} MB"
                f"  {row['gb_s']:6.2f} GB/s  ({what})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
