"""The paged KV cache: per layer, keys and values of shape (blocks, block_size, kv_heads, d),
and how many blocks a device can hold.

One block past the managed ones is scratch: padding rows of a captured decode step write
their keys there, and no sequence's block table ever points at it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .tensor_parallel import shards

log = logging.getLogger(__name__)

BLOCK_SIZE = 16


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: torch.nn.Module) -> CacheShape:
        config = getattr(model.config, "text_config", None) or model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dtype = next(model.parameters()).dtype
        # split over ranks, each keeps the cache of its own kv heads (tensor_parallel.py)
        return cls(config.num_hidden_layers, kv_heads // shards(model), head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize


class KVCache:
    def __init__(
        self, shape: CacheShape, num_blocks: int, device: torch.device, block_size: int = BLOCK_SIZE
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.device = device
        dims = (num_blocks + 1, block_size, shape.kv_heads, shape.head_dim)
        self.layers: list[tuple[Tensor, Tensor]] = [
            (
                torch.zeros(dims, dtype=shape.dtype, device=device),
                torch.zeros(dims, dtype=shape.dtype, device=device),
            )
            for _ in range(shape.layers)
        ]
        self.scratch_slot = num_blocks * block_size
        # with tensor parallelism, rank 0's hook that has the other ranks copy it too
        self.mirror: Callable[[int, int, int | None], None] | None = None

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def copy_block(self, src: int, dst: int, rows: int | None = None) -> None:
        """Copy block ``src`` into ``dst``: its first ``rows`` positions, or all."""
        if self.mirror is not None:
            self.mirror(src, dst, rows)
        rows = self.block_size if rows is None else rows
        for k, v in self.layers:
            k[dst, :rows].copy_(k[src, :rows])
            v[dst, :rows].copy_(v[src, :rows])

    @property
    def bytes(self) -> int:
        return (self.num_blocks + 1) * self.block_size * self.shape.bytes_per_token


def gpu_cache_blocks(
    shape: CacheShape,
    device: torch.device,
    utilization: float,
    peak_bytes: int,
    block_size: int = BLOCK_SIZE,
    cap_bytes: int | None = None,
) -> int:
    """Blocks that fit in ``utilization`` of the GPU (or ``cap_bytes`` of it, if less:
    --max-gpu-memory) after what is in use now (the weights, other processes, the CUDA
    context) and ``peak_bytes`` of activations, vLLM's rule."""
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    allowed = int(total * utilization)
    if cap_bytes is not None:
        allowed = min(allowed, cap_bytes)
    budget = allowed - in_use - peak_bytes
    per_block = block_size * shape.bytes_per_token
    blocks = budget // per_block
    if blocks < 1:
        raise SystemExit(
            f"no room for a KV cache on {device}: {in_use / 2**30:.1f} GiB of "
            f"{total / 2**30:.1f} GiB are in use and a forward pass needs "
            f"{peak_bytes / 2**30:.1f} GiB more; raise --gpu-memory-utilization "
            f"(now {utilization}) or serve a smaller model"
        )
    return int(blocks)
