"""The CUDA graphs the runner replays: a decode step per batch-size bucket, and a prefill
pass per token-count bucket.

A graph reads static device buffers; ``fill`` writes a step's inputs into them with one
host-to-device copy, padding the unused rows so that they write their keys and values to
the cache's scratch row and attend to nothing (a sequence of length 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import attention
from .blocks import cache_row
from .cache import KVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)

# Prefill passes are captured at these token counts (a pass pads up to the next one), each
# packing up to PREFILL_SEQS prompts. Eager, a prefill pass is bound by Python launching
# the modules' ops one by one: admitting took 17.8 ms a launch at 64 streams of the 8B
# shape on the H200 (r6's loop clock), most of it for one or two 128-token prompts. Steps
# of a half where the passes are compute-bound keep the padding under a third.
PREFILL_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PREFILL_SEQS = 64


@dataclass
class DecodeGraph:
    """One decode step of ``rows`` sequences, one token each."""

    graph: torch.cuda.CUDAGraph
    tokens: Tensor
    positions: Tensor
    paged: attention.PagedBatch
    keep: Tensor
    logits: Tensor

    @classmethod
    def buffers(cls, rows: int, max_blocks: int, max_len: int, cache: KVCache) -> DecodeGraph:
        dev = cache.device
        query_start = torch.arange(rows + 1, dtype=torch.int32, device=dev)
        return cls(
            graph=_new_graph(dev),
            tokens=torch.zeros(rows, dtype=torch.long, device=dev),
            positions=torch.zeros(rows, dtype=torch.long, device=dev),
            paged=_static_batch(rows, rows, query_start, 1, max_blocks, max_len, cache),
            keep=torch.arange(rows, device=dev),
            logits=None,  # type: ignore[arg-type]
        )

    def fill(self, tokens: Tensor, seqs: list, block_size: int, scratch: int) -> None:  # type: ignore[type-arg]
        batch, rows = len(seqs), self.tokens.shape[0]
        width = max(len(s.blocks) for s in seqs)
        pad = rows - batch
        host = torch.zeros(4 * rows + rows * width, dtype=torch.long)
        host[:batch] = torch.tensor([s.start for s in seqs])
        host[rows : rows + batch] = torch.tensor(
            [cache_row(s.blocks, s.start, block_size) for s in seqs]
        )
        host[rows + batch : 2 * rows] = scratch
        host[2 * rows : 2 * rows + batch] = host[:batch] + 1
        table = host[4 * rows :].view(rows, width)
        table[:batch] = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs])
        dev = host.to(self.tokens.device, non_blocking=True)
        self.tokens[:batch].copy_(tokens[:batch])
        if pad:
            self.tokens[batch:].zero_()
        self.positions.copy_(dev[:rows])
        self.paged.slot_mapping.copy_(dev[rows : 2 * rows])
        self.paged.seq_lens.copy_(dev[2 * rows : 3 * rows])
        self.paged.block_tables[:, :width].copy_(dev[4 * rows :].view(rows, width))

    def advance(self, tokens: Tensor, slots: Tensor) -> None:
        """The next of several steps in a row: every live row one position on."""
        batch = tokens.shape[0]
        self.tokens[:batch].copy_(tokens)
        self.positions[:batch] += 1
        self.paged.seq_lens[:batch] += 1
        self.paged.slot_mapping[:batch].copy_(slots)


@dataclass
class PrefillGraph:
    """One prefill pass of up to ``tokens`` new tokens of up to ``seqs`` sequences (whole
    prompts or chunks of them, after any cached prefix); logits of each one's last token."""

    graph: torch.cuda.CUDAGraph
    ids: Tensor  # (T,)
    positions: Tensor  # (T,)
    paged: attention.PagedBatch
    keep: Tensor  # (S,)
    logits: Tensor

    @property
    def capacity(self) -> tuple[int, int]:
        return self.ids.shape[0], self.keep.shape[0]

    @classmethod
    def buffers(
        cls, tokens: int, seqs: int, max_blocks: int, max_len: int, cache: KVCache
    ) -> PrefillGraph:
        dev = cache.device
        # the first sequence owns every token, at length 0: it sees nothing
        query_start = torch.full((seqs + 1,), tokens, dtype=torch.int32, device=dev)
        query_start[0] = 0
        return cls(
            graph=_new_graph(dev),
            ids=torch.zeros(tokens, dtype=torch.long, device=dev),
            positions=torch.zeros(tokens, dtype=torch.long, device=dev),
            # an upper bound of the query lengths is all the kernel needs
            paged=_static_batch(tokens, seqs, query_start, tokens, max_blocks, max_len, cache),
            keep=torch.zeros(seqs, dtype=torch.long, device=dev),
            logits=None,  # type: ignore[arg-type]
        )

    def fill(self, seqs: list, block_size: int, scratch: int) -> None:  # type: ignore[type-arg]
        """Write the pass's inputs: ``seqs`` are SeqInputs (tokens, start, blocks)."""
        rows, cap = self.capacity
        width = max(len(s.blocks) for s in seqs)
        tokens = [t for s in seqs for t in s.tokens]
        used = len(tokens)
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + len(s.tokens))
        # padding: the tokens past ``used`` belong to one more sequence, of length 0
        starts += [rows] * (cap - len(seqs))
        lens = [s.start + len(s.tokens) for s in seqs] + [0] * (cap - len(seqs))
        keep = [n - 1 for n in starts[1 : len(seqs) + 1]] + [0] * (cap - len(seqs))
        host = torch.empty(3 * rows + 3 * cap + 1 + cap * width, dtype=torch.long)
        host[:used] = torch.tensor(tokens)
        host[used:rows] = 0
        host[rows : rows + used] = torch.tensor(
            [s.start + i for s in seqs for i in range(len(s.tokens))]
        )
        host[rows + used : 2 * rows] = 0
        host[2 * rows : 2 * rows + used] = torch.tensor(
            [
                cache_row(s.blocks, p, block_size)
                for s in seqs
                for p in range(s.start, s.start + len(s.tokens))
            ]
        )
        host[2 * rows + used : 3 * rows] = scratch
        at = 3 * rows
        host[at : at + cap] = torch.tensor(lens)
        host[at + cap : at + 2 * cap + 1] = torch.tensor(starts)
        host[at + 2 * cap + 1 : at + 3 * cap + 1] = torch.tensor(keep)
        table = host[at + 3 * cap + 1 :].view(cap, width)
        table.zero_()
        table[: len(seqs)] = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs])
        dev = host.to(self.ids.device, non_blocking=True)
        self.ids.copy_(dev[:rows])
        self.positions.copy_(dev[rows : 2 * rows])
        self.paged.slot_mapping.copy_(dev[2 * rows : 3 * rows])
        self.paged.seq_lens.copy_(dev[at : at + cap])
        self.paged.query_start.copy_(dev[at + cap : at + 2 * cap + 1])
        self.keep.copy_(dev[at + 2 * cap + 1 : at + 3 * cap + 1])
        self.paged.block_tables[:, :width].copy_(dev[at + 3 * cap + 1 :].view(cap, width))


def _static_batch(
    tokens: int,
    seqs: int,
    query_start: Tensor,
    max_query_len: int,
    max_blocks: int,
    max_len: int,
    cache: KVCache,
) -> attention.PagedBatch:
    """A graph's PagedBatch buffers: every token's k/v to the scratch row, every sequence
    of length 0, until ``fill`` writes a step's inputs."""
    dev = cache.device
    return attention.PagedBatch(
        slot_mapping=torch.full((tokens,), cache.scratch_slot, dtype=torch.long, device=dev),
        block_tables=torch.zeros(seqs, max_blocks, dtype=torch.int32, device=dev),
        seq_lens=torch.zeros(seqs, dtype=torch.int32, device=dev),
        query_start=query_start,
        max_query_len=max_query_len,
        max_seq_len=max_len,
        caches=cache.layers,
        use_triton=dev.type == "cuda",
    )


def _new_graph(device: torch.device) -> torch.cuda.CUDAGraph:
    # the buffers alone on a CPU: the tests run a pass through them without capturing it
    return torch.cuda.CUDAGraph() if device.type == "cuda" else None  # type: ignore[return-value]


def prefill_bucket(tokens: int, seqs: int) -> int | None:
    """The smallest captured pass that holds ``tokens`` tokens of ``seqs`` sequences."""
    if seqs > PREFILL_SEQS:
        return None
    return next((b for b in PREFILL_BUCKETS if b >= tokens), None)


def prefill_seqs(tokens: int) -> int:
    """How many sequences the pass of ``tokens`` tokens packs at most."""
    return min(tokens, PREFILL_SEQS)
