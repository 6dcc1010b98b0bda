"""Paged attention in Triton: one varlen kernel for prefill, decode and mixed batches.

A program owns one query tile of one sequence and one KV head. The tile's rows are
BLOCK_Q query tokens x the GROUP query heads that share that KV head (GQA), so each key
and value is read once per group, not once per query head. It walks the sequence's KV
in tiles of TILE positions, finding each position's block through the block table, and
keeps an online softmax in float32.

Split-KV: a decode batch of few sequences x KV heads cannot fill the GPU with one
program per (sequence, KV head), so the context is cut into NUM_SEG segments, one
program each, which write an unnormalised partial output with its running max and sum;
a second kernel merges the segments (log-sum-exp). The path and every grid size are
chosen on the host from shapes alone (T, S, max_query_len, max_seq_len), so a launch
reads no device value and can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _find_seq(query_start_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global query tile `tile`; sequence s's tiles start at
    query_start[s] // BLOCK_Q + s, a numbering that needs no prefix sum of tile counts."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    scale, softcap, window, num_seqs, num_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SEG: tl.constexpr, ONE_TILE_PER_SEQ: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.program_id(2)
    if ONE_TILE_PER_SEQ:
        seq = pid
        q_tile = 0
    else:
        seq = _find_seq(query_start_ptr, pid, num_seqs, BLOCK_Q)
        q_tile = pid - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # absolute position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    q_pos = first_pos + q_idx
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    token = (q_begin + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    # exp2 domain throughout: logits are scaled by log2(e)
    # KV positions this tile can see: [kv_lo, kv_hi), cut into NUM_SEG segments of tiles.
    kv_hi = tl.maximum(first_pos + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q), 0)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_pos + q_tile * BLOCK_Q - window + 1, 0)
    tile_lo = kv_lo // TILE
    tile_hi = tl.cdiv(kv_hi, TILE)
    per_seg = tl.cdiv(tile_hi - tile_lo, NUM_SEG)
    t_begin = tile_lo + seg * per_seg
    t_end = tl.minimum(t_begin + per_seg, tile_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for t in range(t_begin, t_end):
        pos = t * TILE + tl.arange(0, TILE)
        pos_ok = pos < seq_len
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(
            k_base + (block * stride_kb + slot * stride_kt)[None, :] + d[:, None],
            mask=pos_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if USE_SOFTCAP:
            # softcap * tanh(x / softcap), tanh written with exp2: Triton has no tanh
            s = s * (scale / softcap)
            s = (1.0 - 2.0 / (tl.exp2(s * (2.0 * LOG2E)) + 1.0)) * (softcap * LOG2E)
        else:
            s = s * (scale * LOG2E)
        visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + (block * stride_vb + slot * stride_vt)[:, None] + d[None, :],
            mask=pos_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SEG == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (token * num_heads + head) * NUM_SEG + seg
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * D_PAD + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SEG: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * num_heads + head) * NUM_SEG + tl.arange(0, NUM_SEG)
    m = tl.load(part_m_ptr + part)
    l_seg = tl.load(part_l_ptr + part)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    total = tl.sum(weight * l_seg, 0)
    d = tl.arange(0, D_PAD)
    acc = tl.load(part_acc_ptr + part[:, None] * D_PAD + d[None, :])
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + d,
        out.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


@dataclass(frozen=True)
class Config:
    """Launch shape: BLOCK_M rows (query tokens x group heads), TILE KV positions a step."""

    block_m: int
    tile: int
    num_seg: int
    num_warps: int
    num_stages: int


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed figure keeps the choice deterministic
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_config(
    num_seqs: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int | None,
    device: torch.device,
) -> Config:
    """Pick tile sizes and the split-KV factor from host-side shapes only."""
    group_rows = triton.next_power_of_2(group)
    if max_query_len * group <= 16 or max_query_len == 1:
        # decode (or a few speculative tokens): one query tile per sequence
        block_m = max(16, triton.next_power_of_2(max_query_len * group))
        tile = 64 if head_dim <= 128 else 32
        # split only when one program per (sequence, KV head) leaves the SMs short of two
        # each: on the H200 splitting b64 x ctx 384 (512 programs) was 17% slower, b1 x
        # ctx 32768 (8 programs) 24x faster at 64 segments (bench/paged_attention_notes.md)
        programs = num_seqs * kv_heads
        sms = _num_sms(device)
        num_seg = 1
        if programs < 2 * sms:
            num_seg = min(64, triton.next_power_of_2(triton.cdiv(4 * sms, programs)))
            if max_seq_len is not None:  # at least two KV tiles a segment
                num_seg = min(num_seg, triton.next_power_of_2(triton.cdiv(max_seq_len, 2 * tile)))
        return Config(block_m, tile, max(num_seg, 1), num_warps=4, num_stages=3)
    if head_dim > 128:  # shared memory: 3 stages of 64 x 256 K and V tiles would not fit
        return Config(max(64, group_rows), tile=64, num_seg=1, num_warps=8, num_stages=2)
    return Config(max(128, group_rows), tile=64, num_seg=1, num_warps=4, num_stages=3)


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start: Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: Tensor | None = None,
    config: Config | None = None,
) -> Tensor:
    """Attention of packed query tokens over a paged KV cache; returns (T, H, D) in q's dtype.

    q: (T, H, D), sequence s owning rows query_start[s]:query_start[s+1]; k_cache, v_cache:
    (num_blocks, block_size, KVH, D), already holding the new tokens; block_tables:
    (S, max_blocks) int32; seq_lens: (S,) int32 context lengths including the new tokens
    (0 marks a padding row, whose output rows are zeros); query_start: (S+1,) int32.
    Query token i of sequence s sits at position seq_lens[s] - q_len_s + i and sees the
    positions p' <= p. Query head h reads KV head h // (H // KVH) (transformers' repeat_kv).

    sliding_window: as transformers' masks for Gemma 2 and Mistral (masking_utils'
    sliding_window_overlay: kv_idx > q_idx - sliding_window), a token at p sees
    p - sliding_window < p' <= p, i.e. sliding_window positions including its own.
    softcap: logits -> softcap * tanh(logits / softcap) before the softmax (Gemma 2),
    logits being scale * q.k.
    max_query_len: a host-side upper bound of the query lengths (1 for pure decode);
    max_seq_len: an optional host-side upper bound of seq_lens, which keeps split-KV from
    cutting short contexts into segments of nothing. config overrides the launch shape
    (benchmarks); the grid depends on shapes only, so the call is graph-capturable.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // kv_heads
    if num_heads % kv_heads or v_cache.shape != k_cache.shape or k_cache.shape[-1] != head_dim:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = config or choose_config(
        num_seqs, kv_heads, group, head_dim, max_query_len, max_seq_len, q.device
    )
    block_q = cfg.block_m // group
    if block_q < 1:
        raise ValueError(f"block_m {cfg.block_m} is smaller than the group of {group} heads")
    d_pad = triton.next_power_of_2(head_dim)
    one_tile = max_query_len <= block_q
    tiles = num_seqs if one_tile else num_tokens // block_q + num_seqs
    if cfg.num_seg > 1:
        part_shape = (num_tokens, num_heads, cfg.num_seg)
        part_acc = torch.empty((*part_shape, d_pad), dtype=torch.float32, device=q.device)
        part_m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
        part_l = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_m = part_l = out  # unused
    window = sliding_window or 0
    _attention_kernel[(tiles, kv_heads, cfg.num_seg)](
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        block_tables, seq_lens, query_start,
        scale, softcap or 1.0, window, num_seqs, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        HEAD_DIM=head_dim, D_PAD=d_pad, GROUP=group,
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, TILE=cfg.tile, BLOCK_SIZE=block_size,
        NUM_SEG=cfg.num_seg, ONE_TILE_PER_SEQ=one_tile,
        USE_WINDOW=window > 0, USE_SOFTCAP=bool(softcap),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.num_seg > 1:
        _merge_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SEG=cfg.num_seg, num_warps=4,
        )  # fmt: skip
    return out


def reference_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start: Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """The function the kernel computes, in float32 torch, one sequence at a time; rows of
    padding sequences are zeros."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start.tolist()
    for s, length in enumerate(seq_lens.tolist()):
        begin, end = starts[s], starts[s + 1]
        if length == 0 or end == begin:
            continue
        blocks = block_tables[s, : math.ceil(length / block_size)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].float()
        values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].float()
        pos = torch.arange(length - (end - begin), length, device=q.device)[:, None]
        seen = torch.arange(length, device=q.device)[None]
        allowed = seen <= pos
        if sliding_window:
            allowed &= seen > pos - sliding_window
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,khd->hnk", q[begin:end].float(), keys) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        probs = torch.softmax(scores.masked_fill(~allowed[None], float("-inf")), dim=-1)
        out[begin:end] = torch.einsum("hnk,khd->nhd", probs, values)
    return out
