"""Attention over the paged KV cache, plugged into transformers' attention interface.

The model's own attention modules compute q, k and v (with their norms and rotary), then
call the function registered here instead of sdpa. It writes the new tokens' keys and
values into the cache rows of ``PagedBatch.slot_mapping`` and attends each query token to
its own sequence's cached positions only, read through the block table. On CUDA the
Triton kernel (triton_attention.py) does the reading; elsewhere a torch loop over the
sequences does, which is the reference the kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMPLEMENTATION = "tokenrelay_paged"


@dataclass
class PagedBatch:
    """Where a forward pass's tokens sit in the cache. Device tensors are what a captured
    graph reads (the runner refills them in place); host lists serve the torch path."""

    slot_mapping: Tensor  # (T,) long: the cache row each new token's k/v goes to
    block_tables: Tensor  # (S, max_blocks) int32
    seq_lens: Tensor  # (S,) int32: context length including the new tokens
    query_start: Tensor  # (S + 1,) int32
    max_query_len: int
    max_seq_len: int
    caches: list[tuple[Tensor, Tensor]]  # per layer: (num_blocks, block_size, kv_heads, d)
    seq_lens_host: list[int] | None = None
    query_start_host: list[int] | None = None
    use_triton: bool = False


def paged_attention_forward(
    module: torch.nn.Module,
    query: Tensor,  # (1, heads, T, d)
    key: Tensor,  # (1, kv_heads, T, d)
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    paged: PagedBatch | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    if paged is None:  # a call from outside the engine (generate(), a test): plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module,
            query,
            key,
            value,
            attention_mask,
            scaling=scaling,
            dropout=dropout,
            sliding_window=sliding_window,
            softcap=softcap,
            **kwargs,
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks are not supported by the paged engine")
    k_cache, v_cache = paged.caches[module.layer_idx]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
    scale = scaling if scaling is not None else 1 / math.sqrt(q.shape[-1])
    window = sliding_window if sliding_window and sliding_window < paged.max_seq_len else None
    if paged.use_triton:
        from .ops import paged_attention_op

        out = paged_attention_op(
            q,
            k,
            v,
            k_cache,
            v_cache,
            paged.slot_mapping,
            paged.block_tables,
            paged.seq_lens,
            paged.query_start,
            scale,
            paged.max_query_len,
            paged.max_seq_len,
            window or 0,
            float(softcap or 0.0),
        )
    else:
        write_kv(k_cache, v_cache, k, v, paged.slot_mapping)
        out = torch_paged_attention(q, k_cache, v_cache, paged, scale, window, softcap or None)
    return out[None], None  # (1, T, heads, d), as the modules expect


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slots: Tensor) -> None:
    """Store (T, kv_heads, d) keys and values at their cache rows."""
    kv_heads, d = k_cache.shape[-2:]
    k_cache.view(-1, kv_heads, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv_heads, d).index_copy_(0, slots, v.to(v_cache.dtype))


def torch_paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    paged: PagedBatch,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Reference paged attention, one sequence at a time, in float32."""
    seq_lens = paged.seq_lens_host or paged.seq_lens.tolist()
    starts = paged.query_start_host or paged.query_start.tolist()
    if paged.max_query_len == 1 and softcap is None and sliding_window is None:
        return _decode_attention(q, k_cache, v_cache, paged, scale)
    block_size, kv_heads, d = k_cache.shape[1:]
    groups = q.shape[1] // kv_heads
    out = torch.zeros_like(q)
    for s, length in enumerate(seq_lens):
        begin, end = starts[s], starts[s + 1]
        if length == 0 or end == begin:
            continue
        blocks = paged.block_tables[s, : -(-length // block_size)]
        if len(blocks) == 1:  # in place (the CPU's one block a sequence)
            keys = k_cache[int(blocks[0]), :length].float()
            values = v_cache[int(blocks[0]), :length].float()
        else:
            keys = k_cache.index_select(0, blocks).reshape(-1, kv_heads, d)[:length].float()
            values = v_cache.index_select(0, blocks).reshape(-1, kv_heads, d)[:length].float()
        queries = q[begin:end].float()  # (n, heads, d)
        n = end - begin
        positions = torch.arange(length - n, length, device=q.device)[:, None]
        seen = torch.arange(length, device=q.device)[None]
        allowed = seen <= positions
        if sliding_window is not None:
            allowed &= seen > positions - sliding_window
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        scores = torch.einsum("nhd,khd->hnk", queries, keys) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[begin:end] = torch.einsum("hnk,khd->nhd", probs, values).to(q.dtype)
    return out


def _decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, paged: PagedBatch, scale: float
) -> Tensor:
    """One query per sequence: gather every sequence's blocks at once and run one masked
    sdpa over the batch (the CPU's decode step; a loop per sequence costs more there)."""
    block_size, kv_heads, d = k_cache.shape[1:]
    batch, heads = q.shape[:2]
    width = -(-paged.max_seq_len // block_size)
    if width == 1:
        return _one_block_attention(q, k_cache, v_cache, paged, scale)
    # index_select, not k_cache[tables]: on a 2-core CPU the advanced-indexing gather took
    # 4-5x as long (595 against 123 us a layer for SmolLM2 at batch 8, context 384)
    rows = paged.block_tables[:, :width].reshape(-1)
    keys = k_cache.index_select(0, rows).view(batch, width * block_size, kv_heads, d)
    values = v_cache.index_select(0, rows).view(batch, width * block_size, kv_heads, d)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    span = torch.arange(width * block_size, device=q.device)
    mask = (span[None] < paged.seq_lens[:, None])[:, None, None]  # (B, 1, 1, span)
    queries = q.view(batch, kv_heads, heads // kv_heads, d)
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
    )
    return out.reshape(batch, heads, d)


def _one_block_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, paged: PagedBatch, scale: float
) -> Tensor:
    """Decode when every sequence sits in one block (the CPU's layout, build.py): one sdpa
    over the cache's first blocks read in place, each query at its block's row."""
    kv_heads, d = k_cache.shape[2:]
    batch, heads = q.shape[:2]
    blocks = paged.block_tables[:, 0].long()
    rows = int(blocks.max()) + 1
    span = paged.max_seq_len
    keys = k_cache[:rows, :span].transpose(1, 2)  # (rows, kv_heads, span, d), a view
    values = v_cache[:rows, :span].transpose(1, 2)
    queries = q.new_zeros(rows, kv_heads, heads // kv_heads, d)
    queries[blocks] = q.view(batch, kv_heads, heads // kv_heads, d)
    # idle rows see one position (a row that sees none would make sdpa's softmax NaN)
    lengths = torch.ones(rows, dtype=paged.seq_lens.dtype, device=q.device)
    lengths[blocks] = paged.seq_lens
    mask = (torch.arange(span, device=q.device)[None] < lengths[:, None])[:, None, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
    )
    return out[blocks].reshape(batch, heads, d)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, paged_attention_forward)
