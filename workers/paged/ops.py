"""The paged attention step as one torch custom op, so ``torch.compile`` treats it as a
single opaque call: it writes the new keys and values into the cache (a mutation the
compiler must not copy a whole cache layer for) and runs the Triton kernel."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("tokenrelay::paged_attention", mutates_args=("k_cache", "v_cache"))
def paged_attention_op(
    q: Tensor,
    key: Tensor,
    value: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
    block_tables: Tensor,
    seq_lens: Tensor,
    query_start: Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int,
    softcap: float,
) -> Tensor:
    from .triton_attention import paged_attention
    from .triton_cache import write_kv

    write_kv(k_cache, v_cache, key, value, slot_mapping)
    return paged_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start,
        scale,
        max_query_len=max_query_len,
        max_seq_len=max_seq_len,
        sliding_window=sliding_window or None,
        softcap=softcap or None,
    )


@paged_attention_op.register_fake
def _(q: Tensor, *args: object) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
