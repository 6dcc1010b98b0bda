"""Writing a step's new keys and values into the paged cache in one kernel launch.

``index_copy_`` does it in two (keys, values), each a few microseconds at decode sizes:
64 launches a step for a 32-layer model, 160-190 us of an H200's 5.7 ms batch-1 step
(bench/step_breakdown.py). One program a token copies both rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < HEADS) & (d < DIM)
    row = slot * (HEADS * DIM) + h * DIM + d
    key = tl.load(k_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + row, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(v_ptr + t.to(tl.int64) * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + row, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Store (T, kv_heads, d) keys and values at their cache rows ``slots`` (T,)."""
    tokens, heads, dim = k.shape
    if tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    _write_kv_kernel[(tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        HEADS=heads,
        DIM=dim,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_D=triton.next_power_of_2(dim),
    )


def check() -> None:
    """The kernel against ``index_copy_`` (run under TRITON_INTERPRET=1 on a CPU)."""
    from .attention import write_kv as reference

    gen = torch.Generator().manual_seed(0)
    for heads, dim, dtype in ((2, 16, torch.float32), (3, 24, torch.float16)):
        pair = [torch.randn(6, 4, heads, dim, generator=gen).to(dtype) for _ in range(2)]
        caches = pair + [c.clone() for c in pair]
        # keys strided as the modules give them, values contiguous
        k = torch.randn(heads, 5, dim, generator=gen).transpose(0, 1)
        v = torch.randn(5, heads, dim, generator=gen)
        slots = torch.tensor([3, 17, 0, 22, 9])
        write_kv(caches[0], caches[1], k, v, slots)
        reference(caches[2], caches[3], k, v, slots)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
