"""The model runner: one forward pass of the model's own transformers modules over a packed
batch, with the paged cache behind their attention.

All new tokens of a step, prompts being prefilled and sequences decoding alike, are packed
into one row of shape (1, T) with their own positions; ``logits_to_keep`` picks each
sequence's last token, so the LM head (and Gemma's logit soft-capping) runs on S rows, not
T. The attention interface (attention.py) gets the cache through the ``paged`` keyword,
which transformers passes down to every attention module. On CUDA the decode step of each
batch-size bucket is captured once in a CUDA graph over static input buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import attention
from .blocks import cache_row
from .cache import KVCache
from .fuse import fuse_projections
from .graphs import (
    BATCH_BUCKETS,
    PREFILL_BUCKETS,
    DecodeGraph,
    PrefillGraph,
    prefill_bucket,
    prefill_seqs,
)

log = logging.getLogger(__name__)


@dataclass
class SeqInput:
    """One sequence's part of a step: its new tokens and where they go."""

    tokens: list[int]  # new tokens (a prompt, a prompt's tail, or one decode token)
    start: int  # position of the first new token
    blocks: list[int]  # the block table, covering start + len(tokens) positions


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        cache: KVCache,
        max_len: int,
        *,
        eager: bool = False,
        prefill_budget: int = 4096,
    ) -> None:
        attention.register()
        model.set_attn_implementation(attention.IMPLEMENTATION)
        fuse_projections(model)
        self.model = model
        self.cache = cache
        self.device = cache.device
        self.max_len = max_len
        self.max_blocks = -(-max_len // cache.block_size)
        self.use_graphs = self.device.type == "cuda" and not eager
        self.use_triton = self.device.type == "cuda"
        self._graphs: dict[int, DecodeGraph] = {}
        self._prefills: dict[int, PrefillGraph] = {}
        self._pool: object = None
        # the decode step compiled once (batch size symbolic), then captured per bucket:
        # the compiler fuses the norms, rotary and activations the modules run one op at
        # a time, which at batch 1 cost more than reading the weights
        self.compiled = self.use_graphs
        self._decode_fn = self._run
        self.max_batch = 0
        self.buckets: list[int] = []
        self.prefill_budget = prefill_budget

    # eager passes (prefill, CPU decode)

    @torch.inference_mode()
    def forward(self, seqs: list[SeqInput]) -> Tensor:
        """Logits (S, vocab) of each sequence's last new token: a captured pass when one
        holds the tokens, else an eager one."""
        bucket = prefill_bucket(sum(len(s.tokens) for s in seqs), len(seqs))
        graph = self._prefills.get(bucket) if bucket else None
        if graph is not None:
            graph.fill(seqs, self.cache.block_size, self.cache.scratch_slot)
            graph.graph.replay()
            return graph.logits[: len(seqs)].clone()  # the next replay overwrites them
        return self.forward_eager(seqs)

    @torch.inference_mode()
    def forward_eager(self, seqs: list[SeqInput], every: bool = False) -> Tensor:
        """Logits of each sequence's last new token, or (``every``: a prompt to score) of
        every new token, (sum of lengths, vocab)."""
        lengths = [len(s.tokens) for s in seqs]
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        tokens = [t for s in seqs for t in s.tokens]
        positions = [s.start + i for s in seqs for i in range(len(s.tokens))]
        bs = self.cache.block_size
        slots = [
            cache_row(s.blocks, p, bs)
            for s in seqs
            for p in range(s.start, s.start + len(s.tokens))
        ]
        width = max(len(s.blocks) for s in seqs)
        tables = [s.blocks + [0] * (width - len(s.blocks)) for s in seqs]
        seq_lens = [s.start + len(s.tokens) for s in seqs]
        paged = attention.PagedBatch(
            slot_mapping=to_device(self.device, slots),
            block_tables=to_device(self.device, tables, torch.int32),
            seq_lens=to_device(self.device, seq_lens, torch.int32),
            query_start=to_device(self.device, starts, torch.int32),
            max_query_len=max(lengths),
            max_seq_len=max(seq_lens),
            caches=self.cache.layers,
            # the torch path's copies; the kernel reads the device tensors (and a compiled
            # pass would guard on every value of a list)
            seq_lens_host=None if self.use_triton else seq_lens,
            query_start_host=None if self.use_triton else starts,
            use_triton=self.use_triton,
        )
        return self._run(
            to_device(self.device, tokens)[None],
            to_device(self.device, positions)[None],
            to_device(
                self.device, list(range(starts[-1])) if every else [n - 1 for n in starts[1:]]
            ),
            paged,
        )

    def _run(
        self, ids: Tensor, positions: Tensor, keep: Tensor, paged: attention.PagedBatch
    ) -> Tensor:
        out = self.model(
            input_ids=ids,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=keep,
            paged=paged,
        )
        return out.logits[0].float()

    # decode

    @torch.inference_mode()
    def decode(self, tokens: Tensor, seqs: list[SeqInput]) -> Tensor:
        """One decode step: ``tokens`` (B,) on the device are each sequence's input (the
        caller may pass the previous step's output without reading it back)."""
        if not self.use_graphs or len(seqs) > self.max_batch:
            return self.forward_tokens(tokens, seqs)
        batch = len(seqs)
        bucket = next(b for b in self.buckets if b >= batch)
        graph = self._graphs.get(bucket) or self._capture(bucket)
        graph.fill(tokens, seqs, self.cache.block_size, self.cache.scratch_slot)
        graph.graph.replay()
        return graph.logits[:batch]

    @torch.inference_mode()
    def decode_steps(
        self, tokens: Tensor, seqs: list[SeqInput], steps: int, sample: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """``steps`` decode steps back to back, each one's sampled tokens the next one's
        input, with no read by the host in between; returns the (steps, B) tokens. The
        sequences' blocks must cover ``start + steps`` positions."""
        batch = len(seqs)
        if not self.use_graphs or batch > self.max_batch:
            out = []
            for j in range(steps):
                moved = [SeqInput([], s.start + j, s.blocks) for s in seqs]
                tokens = sample(self.forward_tokens(tokens, moved))
                out.append(tokens)
            return torch.stack(out)
        bucket = next(b for b in self.buckets if b >= batch)
        graph = self._graphs.get(bucket) or self._capture(bucket)
        graph.fill(tokens, seqs, self.cache.block_size, self.cache.scratch_slot)
        later = None
        if steps > 1:
            bs = self.cache.block_size
            later = to_device(
                self.device,
                [[cache_row(s.blocks, s.start + j, bs) for s in seqs] for j in range(1, steps)],
            )
        out = []
        for j in range(steps):
            if j:
                assert later is not None
                graph.advance(out[-1], later[j - 1])
            graph.graph.replay()
            out.append(sample(graph.logits[:batch]))
        return torch.stack(out)

    def forward_tokens(self, tokens: Tensor, seqs: list[SeqInput]) -> Tensor:
        """An eager decode step whose input tokens are already on the device."""
        bs = self.cache.block_size
        batch = len(seqs)
        slots = [cache_row(s.blocks, s.start, bs) for s in seqs]
        width = max(len(s.blocks) for s in seqs)
        seq_lens = [s.start + 1 for s in seqs]
        starts = list(range(batch + 1))
        paged = attention.PagedBatch(
            slot_mapping=to_device(self.device, slots),
            block_tables=to_device(
                self.device, [s.blocks + [0] * (width - len(s.blocks)) for s in seqs], torch.int32
            ),
            seq_lens=to_device(self.device, seq_lens, torch.int32),
            query_start=to_device(self.device, starts, torch.int32),
            max_query_len=1,
            max_seq_len=max(seq_lens),
            caches=self.cache.layers,
            seq_lens_host=seq_lens,
            query_start_host=starts,
            use_triton=self.use_triton,
        )
        positions = to_device(self.device, [s.start for s in seqs])
        keep = torch.arange(batch, device=self.device)
        return self._run(tokens[None], positions[None], keep, paged)

    def capture_graphs(self, max_batch: int) -> None:
        """Capture every bucket's decode step up to ``max_batch`` sequences now."""
        self.max_batch = max_batch
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        if not self.use_graphs:
            return
        self._pool = torch.cuda.graph_pool_handle()
        if self.compiled:
            self._decode_fn = torch.compile(self._run, dynamic=False)
        for bucket in reversed(self.buckets):  # largest first: the others reuse its memory
            try:
                self._capture(bucket)
            except Exception:
                if not self.compiled:
                    raise
                log.exception(
                    "torch.compile of the decode step failed; running it uncompiled "
                    "(slower at small batches). --enforce-eager skips the attempt."
                )
                self.compiled, self._decode_fn = False, self._run
                self._graphs.clear()
                self._capture(bucket)
        log.info(
            "captured %d decode graphs (batch sizes %s)", len(self._graphs), sorted(self._graphs)
        )
        try:
            for tokens in reversed(self.prefill_buckets()):
                self._capture_prefill(tokens)
        except Exception:  # the passes stay eager: slower admission, same tokens
            log.exception(
                "capturing the prefill passes failed; prefill runs eagerly. "
                "--enforce-eager skips every graph."
            )
            self._prefills.clear()
        log.info(
            "captured %d prefill graphs (up to %d tokens)",
            len(self._prefills),
            max(self._prefills, default=0),
        )

    def prefill_buckets(self) -> list[int]:
        return [b for b in PREFILL_BUCKETS if b <= max(self.prefill_budget, PREFILL_BUCKETS[0])]

    def _capture(self, bucket: int) -> DecodeGraph:
        static = DecodeGraph.buffers(bucket, self.max_blocks, self.max_len, self.cache)
        # warm up (compile, Triton's autotuning, cuBLAS's choices) outside the capture
        static.paged.seq_lens.fill_(1)
        ids, positions = static.tokens[None], static.positions[None]
        if self.compiled and bucket > 1:  # a size of 1 is specialised, never symbolic
            for t in (ids, positions):
                torch._dynamo.mark_dynamic(t, 1)
            for t in (
                static.keep,
                static.paged.slot_mapping,
                static.paged.block_tables,
                static.paged.seq_lens,
                static.paged.query_start,
            ):
                torch._dynamo.mark_dynamic(t, 0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_fn(ids, positions, static.keep, static.paged)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode(), torch.cuda.graph(static.graph, pool=self._pool):
            static.logits = self._decode_fn(ids, positions, static.keep, static.paged)
        self._graphs[bucket] = static
        return static

    def _capture_prefill(self, tokens: int) -> None:
        """Capture the eager prefill pass of ``tokens`` tokens (the compiled step's symbolic
        shapes assume one token a sequence; compiling prefill too took minutes, r7)."""
        static = PrefillGraph.buffers(
            tokens, prefill_seqs(tokens), self.max_blocks, self.max_len, self.cache
        )
        ids, positions = static.ids[None], static.positions[None]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            self._run(ids, positions, static.keep, static.paged)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.inference_mode(), torch.cuda.graph(static.graph, pool=self._pool):
            static.logits = self._run(ids, positions, static.keep, static.paged)
        self._prefills[tokens] = static


def to_device(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> Tensor:  # type: ignore[type-arg]
    """A small host list on the device without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
