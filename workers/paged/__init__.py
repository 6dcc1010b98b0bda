"""The paged engine: continuous batching over a paged KV cache, for any decoder-only model
transformers ships.

How a step flows through the parts::

    engine.py      take jobs, admit what the cache has blocks for, preempt when it is full
        |              (sequences.py: a request's sequences and a launched step)
    blocks.py      the block manager: block tables, reference counts, the free list
        |
    runner.py      pack the step's tokens into one (1, T) row and run the model's own
        |              modules; decode steps replay a CUDA graph per batch bucket
    attention.py   the attention function transformers calls: write k/v into the cache,
        |              attend over live tokens only (triton_attention.py on CUDA)
    cache.py       the per-layer cache tensors and how many blocks fit on the device
        |
    sampling       (workers/sampling.py) every row's token on the device, in one pass,
        |              after the request's penalties, logit_bias and min_tokens
        |              (workers/penalties.py, from each sequence's token history)
    scoring.py     where a job asks for logprobs: its rows' raw log-softmax as each step
        |              samples; an echo's prompt prefilled with every position's logits
    output.py      the host's side: tokens to text, stop strings, finish reasons, events

Split over N GPUs (--tensor-parallel-size), tensor_parallel.py cuts every layer's weights
and the cache's kv heads N ways, and ranks.py runs the loop above on rank 0, its runner
sending each pass to the other ranks' runners.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Multimodal and encoder-decoder models take inputs the packed text batch cannot carry.
_UNSUPPORTED = ("ForConditionalGeneration", "Seq2Seq", "ForVision")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the paged engine cannot run ``model``, or None if it can."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False) or any(s in name for s in _UNSUPPORTED):
        return f"{name} is not a decoder-only text model"
    if not name.endswith("ForCausalLM"):
        return f"{name} is not a causal language model"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{name} does not take transformers' pluggable attention"
    if getattr(config, "use_mla", False) or hasattr(config, "kv_lora_rank"):
        return f"{name} uses latent attention, whose cache the engine does not lay out"
    if getattr(config, "layer_types", None) and any(
        t not in ("full_attention", "sliding_attention") for t in config.layer_types
    ):
        return f"{name} mixes in layers that are not attention (linear attention, mamba)"
    try:
        next(model.parameters())
    except StopIteration:
        return f"{name} has no parameters"
    devices = {p.device for p in model.parameters()}
    if len(devices) > 1:
        return "the model is split over several devices"
    return None
