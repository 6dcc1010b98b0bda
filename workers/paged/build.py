"""Sizing and starting the paged engine: the KV cache from the device's memory, the
longest sequence from the model's config, the concurrency from what the cache holds.
Split over GPUs, ranks.py starts the other ranks and calls the same sizing on each."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .blocks import BlockTable
from .cache import BLOCK_SIZE, CacheShape, KVCache, gpu_cache_blocks
from .engine import PagedEngine
from .runner import ModelRunner, SeqInput
from .tensor_parallel import same_everywhere, shards

log = logging.getLogger(__name__)

MAX_GPU_SEQS = 256
TYPICAL_LEN = 2048  # what a GPU's default concurrency assumes a sequence grows to
CPU_SEQS = 8


def model_context(model: torch.nn.Module) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return int(getattr(config, "max_position_embeddings", 0) or 4096)


@dataclass(frozen=True)
class CachePlan:
    """What the engine's cache and scheduler are sized to."""

    blocks: int
    block_size: int
    max_seqs: int
    max_len: int


def build_paged_engine(
    model: torch.nn.Module,
    tokenizer: object,
    *,
    max_model_len: int | None,
    max_seqs: int | None,
    gpu_memory_utilization: float = 0.9,
    prefill_budget: int = 4096,
    eager: bool = False,
) -> PagedEngine:
    plan = plan_cache(
        model,
        max_model_len=max_model_len,
        max_seqs=max_seqs,
        gpu_memory_utilization=gpu_memory_utilization,
        prefill_budget=prefill_budget,
    )
    return PagedEngine(
        model,
        tokenizer,  # type: ignore[arg-type]
        num_blocks=plan.blocks,
        max_seqs=plan.max_seqs,
        max_len=plan.max_len,
        prefill_budget=prefill_budget,
        eager=eager,
        block_size=plan.block_size,
    )


def plan_cache(
    model: torch.nn.Module,
    *,
    max_model_len: int | None,
    max_seqs: int | None,
    gpu_memory_utilization: float = 0.9,
    prefill_budget: int = 4096,
    cap_bytes: int | None = None,
) -> CachePlan:
    """The cache's blocks from the device's memory, the longest sequence from the model's
    config, the concurrency from what the cache holds. Split over ranks, every rank runs
    this in step (the profile pass all-reduces) and all take the smallest GPU's blocks."""
    device = next(model.parameters()).device
    shape = CacheShape.of(model)
    context = model_context(model)
    if device.type != "cuda":
        max_len = min(max_model_len or context, context)
        seqs = max_seqs or CPU_SEQS
        # One block a sequence, as long as the longest: decode attention then reads the
        # cache in place. Gathering 16-token blocks was a sixth of SmolLM2's decode step on
        # the 2-core CPU (aten::index, 23 of 138 ms at batch 8, context 384). The memory is
        # the dense equivalent, and pages are committed only as they are used.
        return CachePlan(seqs, max_len, seqs, max_len)
    peak = _activation_peak(model, shape, device, prefill_budget)
    vocab = model.get_output_embeddings().weight.shape[0]
    peak += (max_seqs or MAX_GPU_SEQS) * vocab * 4 * 6  # logits and the sampler's copies
    blocks = gpu_cache_blocks(shape, device, gpu_memory_utilization, peak, cap_bytes=cap_bytes)
    if shards(model) > 1:
        blocks = same_everywhere(blocks)
    tokens = blocks * BLOCK_SIZE
    max_len = min(max_model_len, context) if max_model_len else context
    if max_model_len is None and tokens < max_len:
        max_len = tokens  # one sequence must fit; say so rather than fail later
        log.warning(
            "the KV cache holds %d tokens, fewer than the model's context of %d: "
            "--max-model-len is %d",
            tokens,
            context,
            max_len,
        )
    if tokens < max_len:
        raise SystemExit(
            f"--max-model-len {max_len} does not fit: the KV cache holds {tokens} tokens "
            f"at --gpu-memory-utilization {gpu_memory_utilization}; lower the first or "
            "raise the second"
        )
    seqs = max_seqs or max(1, min(MAX_GPU_SEQS, tokens // TYPICAL_LEN))
    return CachePlan(blocks, BLOCK_SIZE, seqs, max_len)


@torch.inference_mode()
def _activation_peak(
    model: torch.nn.Module, shape: CacheShape, device: torch.device, tokens: int
) -> int:
    """Memory one prefill of ``tokens`` tokens takes beyond the weights (vLLM's profile
    run), measured on a scratch cache just big enough for it."""
    scratch = KVCache(shape, -(-tokens // BLOCK_SIZE), device)
    runner = ModelRunner(model, scratch, tokens, eager=True)
    table = BlockTable(list(range(scratch.num_blocks)))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.forward([SeqInput([1] * tokens, 0, table.blocks)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del scratch, runner
    torch.cuda.empty_cache()
    log.info("a prefill of %d tokens takes %.2f GiB of activations", tokens, peak / 2**30)
    return int(peak)
