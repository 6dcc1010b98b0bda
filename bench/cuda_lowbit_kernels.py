"""Low-bit GEMM candidates on a CUDA GPU for `--low-bit` (issue 13), 8B Llama layer shapes.

    bash bench/gpu_run.sh py bench/cuda_lowbit_kernels.py [--layers 8] [--out FILE]

For each candidate and each batch size M, eight distinct layers (q/k/v fused, o, gate/up
fused, down: 32 products, 3.5 GB of bf16 weights, so nothing stays in L2) are captured in
one CUDA graph and timed by replay; the result is microseconds a layer and the bytes of
weight read per second. Each candidate's output is checked against the bf16 product of its
own dequantized weight. Candidates:

- bf16: F.linear (cuBLAS), the baseline.
- tinygemm int4: torch's own ``aten._weight_int4pack_mm`` (groups of 32 or 128, a scale and
  a zero per group: the same arithmetic as the CPU int4 format).
- gemlite A16W4 / A16W8: Triton low-bit kernels (PyPI ``gemlite``), weight-only int4 in
  groups and int8 per output channel.
- fp8: weights e4m3 with a scale per output channel, activations quantized per row on the
  fly, ``torch._scaled_mm`` (cuBLASLt fp8).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
BATCHES = [1, 16, 64, 256]


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def graph_time(calls, iters: int = 20) -> float:
    """Seconds a replay of all calls takes (median of iters)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def quant_int4(w: torch.Tensor, group: int):
    """Symmetric int4 in groups (GGUF Q4_0's grid): values 0..15, w = (q - 8) * scale."""
    n, k = w.shape
    g = w.float().view(n, k // group, group)
    extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]
    scale = extreme / -8
    scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
    q = (torch.round(g / scale[..., None]).clamp(-8, 7) + 8).view(n, k).to(torch.uint8)
    return q, scale  # (N, K) 0..15, (N, K / group)


def deq_int4(q, scale, group):
    n, k = q.shape
    return ((q.view(n, k // group, group).float() - 8) * scale[..., None]).view(n, k)


class Bf16:
    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return F.linear(x, self.w)

    def ref(self):
        return self.w

    def nbytes(self):
        return self.w.numel() * 2


class TinyGemm:
    def __init__(self, w, group):
        self.group = group
        q, scale = quant_int4(w, group)
        n, k = q.shape
        packed = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()  # (N, K/2) uint8, high nibble first
        self.packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        zero = torch.zeros_like(scale)  # w = (q - 8) * scale + zero
        self.sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self._ref = deq_int4(q, scale, group).to(torch.bfloat16)
        self.n = n

    def __call__(self, x):
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.sz)

    def ref(self):
        return self._ref

    def nbytes(self):
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * 2


class Gemlite:
    """A gemlite layer (``lin``) with its dequantized weight and its bytes."""

    def __call__(self, x):
        return self.lin(x)

    def ref(self):
        return self._ref

    def nbytes(self):
        return self._bytes


class GemliteW4(Gemlite):
    def __init__(self, w, group):
        from gemlite.helper import A16Wn

        q, scale = quant_int4(w, group)
        zeros = torch.full_like(scale, 8.0)
        self.lin = A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
            q, scale.to(torch.bfloat16), zeros.to(torch.bfloat16), 4, group
        )
        self._ref = deq_int4(q, scale, group).to(torch.bfloat16)
        self._bytes = q.numel() // 2 + scale.numel() * 4


class GemliteW8(Gemlite):
    def __init__(self, w):
        from gemlite.helper import A16W8_INT8

        scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-6) / 127
        q = torch.round(w.float() / scale).clamp(-127, 127)
        self._ref = (q * scale).to(torch.bfloat16)
        self.lin = A16W8_INT8(device="cuda", dtype=torch.bfloat16).from_weights(
            q.to(torch.int8), scales=scale.to(torch.bfloat16)
        )
        self._bytes = w.numel()


class Fp8Rowwise:
    def __init__(self, w):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        scale = w.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / fmax
        self.q = (w.float() / scale).to(torch.float8_e4m3fn)
        self.scale = scale.T.contiguous()  # (1, N)
        self._ref = (self.q.float() * scale).to(torch.bfloat16)

    def __call__(self, x):
        fmax = torch.finfo(torch.float8_e4m3fn).max
        xs = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / fmax
        xq = (x.float() / xs).to(torch.float8_e4m3fn)
        return torch._scaled_mm(
            xq, self.q.T, scale_a=xs, scale_b=self.scale, out_dtype=torch.bfloat16
        )

    def ref(self):
        return self._ref

    def nbytes(self):
        return self.q.numel()


KINDS = [
    ("bf16", lambda w: Bf16(w)),
    ("tinygemm int4 g32", lambda w: TinyGemm(w, 32)),
    ("tinygemm int4 g128", lambda w: TinyGemm(w, 128)),
    ("gemlite A16W4 g32", lambda w: GemliteW4(w, 32)),
    ("gemlite A16W4 g128", lambda w: GemliteW4(w, 128)),
    ("gemlite A16W8 int8", lambda w: GemliteW8(w)),
    ("fp8 rowwise _scaled_mm", lambda w: Fp8Rowwise(w)),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kinds", default=",".join(k for k, _ in KINDS))
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    try:
        import gemlite
        from gemlite.core import GemLiteLinearTriton

        # the H200 is an H100's SM (132 SMs, sm_90): gemlite ships tuned configs for the H100
        path = gemlite.__file__.rsplit("/", 1)[0] + "/configs/h100.json"
        print("gemlite configs:", GemLiteLinearTriton.load_config(path))
    except Exception as e:
        print("gemlite unavailable:", e)
    weights = [
        {name: 0.02 * randn(n, k) for name, (n, k) in SHAPES.items()} for _ in range(args.layers)
    ]
    results = []
    wanted = args.kinds.split(",")
    for kind, make in KINDS:
        if kind not in wanted:
            continue
        t0 = time.monotonic()
        try:
            ops = [{name: make(w) for name, w in layer.items()} for layer in weights]
        except Exception as e:
            print(f"{kind}: cannot build: {type(e).__name__}: {e}")
            continue
        built = time.monotonic() - t0
        nbytes = sum(op.nbytes() for layer in ops for op in layer.values())
        row = {"kind": kind, "build_s": round(built, 1), "weight_gb": round(nbytes / 1e9, 3)}
        for m in BATCHES:
            xs = {name: randn(m, k) for name, (n, k) in SHAPES.items()}
            try:
                err = 0.0
                for name, op in ops[0].items():
                    got = op(xs[name]).float()
                    want = F.linear(xs[name], op.ref()).float()
                    err = max(err, ((got - want).norm() / want.norm()).item())
                t1 = time.monotonic()
                calls = [
                    lambda op=op, x=xs[name]: op(x) for layer in ops for name, op in layer.items()
                ]
                t = graph_time(calls)
                row[f"m{m}_us_layer"] = round(t / args.layers * 1e6, 1)
                row[f"m{m}_tb_s"] = round(nbytes / t / 1e12, 2)
                row[f"m{m}_err"] = float(f"{err:.2e}")
                row[f"m{m}_first_s"] = round(time.monotonic() - t1, 1)
            except Exception as e:
                row[f"m{m}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(json.dumps(row), flush=True)
        results.append(row)
        del ops
        torch.cuda.empty_cache()
    base = next((r for r in results if r["kind"] == "bf16"), None)
    print(f"\n{'kind':26s} " + " ".join(f"{'M=' + str(m):>16s}" for m in BATCHES))
    for r in results:
        cells = []
        for m in BATCHES:
            us = r.get(f"m{m}_us_layer")
            if us is None:
                cells.append(f"{'error':>16s}")
                continue
            speed = base[f"m{m}_us_layer"] / us if base and f"m{m}_us_layer" in base else 0
            cells.append(f"{us:8.1f}us {speed:4.2f}x")
        print(f"{r['kind']:26s} " + " ".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
