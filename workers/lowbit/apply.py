"""Quantize a loaded model in place for ``--low-bit``: every Linear (the LM head too) takes
its weight in the format's stored form, q/k/v and gate/up fused first so each group is one
quantized product."""

from __future__ import annotations

import ctypes
import gc
import logging
import time

import torch
from torch import nn

from ..paged.fuse import ProjectionPart, fuse_projections
from .formats import FORMATS, LowBit
from .linear import Int8Weight, QuantEmbedding, QuantLinear, can_quantize, quantize_weight

log = logging.getLogger(__name__)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, quantized weights included, each
    shared tensor once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    tables: set[int] = set()
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            if id(module.qweight) not in tables:  # a tied table once
                tables.add(id(module.qweight))
                total += module.weight_bytes()
    for group in _groups(model):
        if group.op is not None:
            total += group.op.weight_bytes()  # type: ignore[operator]
    return total


def quantize_model(model: nn.Module, fmt: LowBit) -> None:
    """Replace the model's Linears by QuantLinears of ``fmt``; logs what it did."""
    started = time.monotonic()
    before = weight_bytes(model)
    fuse_projections(model)
    done, kept = 0, []
    for group in _groups(model):
        if group.weight is not None and can_quantize(group.weight, fmt):
            group.op = quantize_weight(group.weight, fmt.name, group.bias)
            group.weight = group.bias = None
            done += 1
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and type(head) is not nn.Linear:
        head = None
    for module in list(model.modules()):
        if isinstance(module, ProjectionPart) and module.group.op is not None:
            module.weight = module.bias = None  # type: ignore[assignment]
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            # the LM head in 8 bits under a 4-bit format, as llama.cpp keeps its output
            # tensor in 6: in 4 it cost SmolLM2 a third of its perplexity (tests/workers/
            # test_lowbit.py)
            fmt_here = FORMATS["sym_int8"] if child is head and fmt.bits == 4 else fmt
            if not can_quantize(child.weight, fmt_here):
                kept.append(f"{name} {tuple(child.weight.shape)}")
                continue
            bias = child.bias.detach() if child.bias is not None else None
            setattr(module, name, quantize_weight(child.weight.detach(), fmt_here.name, bias))
            done += 1
    if _quantize_embedding(model, head):
        done += 1
    _give_back_memory()
    after = weight_bytes(model)
    log.info(
        "--low-bit %s (%s): weights %.1f MiB -> %.1f MiB (%.2fx) in %.1f s; %d linears quantized%s",
        fmt.name,
        fmt.summary,
        before / 2**20,
        after / 2**20,
        after / before,
        time.monotonic() - started,
        done,
        f", kept in float: {', '.join(kept)}" if kept else "",
    )
    model.low_bit = fmt.name  # type: ignore[assignment]


def _quantize_embedding(model: nn.Module, head: nn.Module | None) -> bool:
    """The input embedding in 8 bits, sharing the LM head's table when they were tied (a
    float32 table is most of a small model: 113 of SmolLM2's 513 MiB)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(emb) is not nn.Embedding:  # e.g. Gemma's scaled embedding: left as it is
        return False
    new_head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight  # type: ignore[union-attr]
    table: Int8Weight
    if tied and isinstance(new_head, QuantLinear) and isinstance(new_head.qweight, Int8Weight):
        table = new_head.qweight
    else:
        table = Int8Weight.quantize(emb.weight.detach(), FORMATS["sym_int8"])
    model.set_input_embeddings(QuantEmbedding(table, emb.padding_idx))
    return True


def _groups(model: nn.Module) -> list:  # type: ignore[type-arg]
    groups = {id(m.group): m.group for m in model.modules() if isinstance(m, ProjectionPart)}
    return list(groups.values())


def _give_back_memory() -> None:
    """Hand the float weights' pages back to the system: freed, they would stay in the
    allocator's heap and in the worker's RSS."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
