"""Llama-family forward passes over a slotted, preallocated KV cache.

Weights come from a transformers model (Llama, Mistral, Qwen2-style biases); the maths is
the same as transformers' (RMSNorm, rotary, grouped-query attention, SwiGLU), so greedy
output matches it (see tests/workers/test_llama_runner.py). What differs is the cache: one
tensor per layer of shape (slots, kv_heads, max_len, head_dim), where each running sequence
owns a slot and its own length, so sequences of any length decode together in one batch.
On CUDA the decode step of each batch size is captured once in a CUDA graph.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

SUPPORTED = {"llama", "mistral", "qwen2"}
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def supports(model: torch.nn.Module) -> bool:
    config = model.config
    return (
        getattr(config, "model_type", "") in SUPPORTED
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "mlp_bias", False)
        and hasattr(model, "model")
        and hasattr(model.model, "rotary_emb")
    )


@dataclass
class _Layer:
    ln1: Tensor
    qkv: Tensor | torch.nn.Module  # (q + k + v rows, hidden), or a quantized Linear
    qkv_bias: Tensor | None
    o: Tensor | torch.nn.Module
    ln2: Tensor
    gate_up: Tensor | torch.nn.Module  # (2 * intermediate, hidden)
    down: Tensor | torch.nn.Module


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, slots: int, max_len: int) -> None:
        config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.slots = slots
        self.max_len = max_len
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.vocab = config.vocab_size
        self.embed = model.model.embed_tokens  # modules: either may be quantized (lowbit/)
        self.norm = model.model.norm.weight
        self.lm_head = model.lm_head
        self.layers = [_take_layer(layer) for layer in model.model.layers]
        # One position past max_len is scratch: padding rows and graph warm-ups write there,
        # and no real sequence ever attends to it.
        self.scratch = max_len
        positions = torch.arange(max_len + 1, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = model.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # (max_len, head_dim)
        shape = (len(self.layers), slots, self.kv_heads, max_len + 1, self.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.rows = torch.arange(slots, device=self.device)
        self.span = torch.arange(max_len + 1, device=self.device)
        self._graphs: dict[int, _Graph] = {}
        self.use_graphs = self.device.type == "cuda"

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # prefill

    def prefill(self, slot: int, ids: list[int]) -> Tensor:
        """Run a prompt into ``slot``'s cache; returns the last position's logits (vocab,)."""
        return self.prefill_batch([slot], [ids])[0]

    def prefill_batch(self, slots: list[int], prompts: list[list[int]]) -> Tensor:
        """Run several prompts, each into its slot, in one forward pass; returns each
        prompt's last logits (B, vocab)."""
        return self.prefill_scored(slots, prompts)[0]

    @torch.inference_mode()
    def prefill_scored(
        self, slots: list[int], prompts: list[list[int]], every: Collection[int] = ()
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Run several prompts, each into its slot, in one forward pass.

        Prompts are right-padded to the longest: with causal attention a real token never
        sees the padding after it, and the padding's cache entries lie past the prompt,
        where decoding overwrites them. Returns each prompt's last logits (B, vocab), and
        for the rows in ``every`` (prompts to score: echo with logprobs) the logits of
        every position, (len, vocab) each.
        """
        batch, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        for row, ids in enumerate(prompts):
            tokens[row, : len(ids)] = torch.tensor(ids)
        rows = torch.tensor(slots, device=self.device)
        x = self.embed(tokens.to(self.device))  # (B, width, hidden)
        cos, sin = self.cos[:width], self.sin[:width]
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # (B, heads, width, d)
            self.k_cache[i, rows, :, :width] = k
            self.v_cache[i, rows, :, :width] = v
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = self._finish_layer(layer, x, attn.transpose(1, 2).reshape(batch, width, -1))
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        full = {row: self._logits(x[row, : len(prompts[row])]) for row in every}
        return self._logits(x[torch.arange(batch, device=self.device), last]), full

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Share a prefilled prompt with another slot (the n choices of one request)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    # decode

    @torch.inference_mode()
    def decode(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One step for slots 0..B-1: token b sits at positions[b] of slot b.

        Returns logits (B, vocab). Rows of free slots should carry ``self.scratch`` as their
        position, so they write nowhere that matters.
        """
        batch = tokens.shape[0]
        if not self.use_graphs:
            span = int(positions.max()) + 1
            return self._decode(tokens, positions, span)
        bucket = next((b for b in BATCH_BUCKETS if b >= batch and b <= self.slots), self.slots)
        graph = self._graphs.get(bucket) or self._capture(bucket)
        graph.tokens.zero_()
        graph.positions.fill_(self.scratch)
        graph.tokens[:batch] = tokens
        graph.positions[:batch] = positions
        graph.graph.replay()
        return graph.logits[:batch]

    def _decode(self, tokens: Tensor, positions: Tensor, span: int) -> Tensor:
        batch = tokens.shape[0]
        rows = self.rows[:batch]
        x = self.embed(tokens)[:, None]  # (B, 1, hidden)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, d)
        # (B, 1, 1, span): a slot sees its own tokens up to and including this one
        mask = (self.span[:span][None] <= positions[:, None])[:, None, None]
        groups = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)  # (B, h, 1, d)
            self.k_cache[i, rows, :, positions] = k[:, :, 0]
            self.v_cache[i, rows, :, positions] = v[:, :, 0]
            # Decode has one query per head: the heads sharing a KV head become that head's
            # queries, so attention reads the cache as is, without repeating it.
            q = q.view(batch, self.kv_heads, groups, self.head_dim)
            keys = self.k_cache[i, :batch, :, :span]
            values = self.v_cache[i, :batch, :, :span]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = self._finish_layer(layer, x, attn.reshape(batch, 1, -1))
        return self._logits(x[:, 0])

    def capture_graphs(self) -> None:
        """Capture every batch size's decode step now, before any request needs it."""
        if self.use_graphs:
            for bucket in BATCH_BUCKETS:
                if bucket <= self.slots and bucket not in self._graphs:
                    self._capture(bucket)
            if self.slots not in self._graphs:
                self._capture(self.slots)
            log.info(
                "captured %d decode graphs (batch sizes %s)",
                len(self._graphs),
                sorted(self._graphs),
            )

    def _capture(self, bucket: int) -> _Graph:
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        positions = torch.full((bucket,), self.scratch, dtype=torch.long, device=self.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):
                self._decode(tokens, positions, self.max_len + 1)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph):
            logits = self._decode(tokens, positions, self.max_len + 1)
        self._graphs[bucket] = _Graph(graph, tokens, positions, logits)
        return self._graphs[bucket]

    # shared pieces

    def _qkv(self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        batch, n, _ = x.shape
        h = _rms_norm(x, layer.ln1, self.eps)
        qkv = _linear(h, layer.qkv, layer.qkv_bias)
        d, kv = self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.heads * d, kv, kv], dim=-1)
        q = q.view(batch, n, self.heads, d).transpose(1, 2)
        k = k.view(batch, n, self.kv_heads, d).transpose(1, 2)
        v = v.view(batch, n, self.kv_heads, d).transpose(1, 2)
        cos, sin = cos[:, None] if cos.dim() == 3 else cos, sin[:, None] if sin.dim() == 3 else sin
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _finish_layer(self, layer: _Layer, x: Tensor, attn: Tensor) -> Tensor:
        x = x + _linear(attn, layer.o)
        h = _rms_norm(x, layer.ln2, self.eps)
        gate, up = _linear(h, layer.gate_up).chunk(2, dim=-1)
        return x + _linear(F.silu(gate) * up, layer.down)

    def _logits(self, x: Tensor) -> Tensor:
        return self.lm_head(_rms_norm(x, self.norm, self.eps)).float()  # type: ignore[no-any-return]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: Tensor
    positions: Tensor
    logits: Tensor


def _take_layer(layer: torch.nn.Module) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    qkv, bias = _fused(projections)
    gate_up, _ = _fused((mlp.gate_proj, mlp.up_proj))
    return _Layer(
        ln1=layer.input_layernorm.weight,
        qkv=qkv,
        qkv_bias=bias,
        o=_weight(attn.o_proj),
        ln2=layer.post_attention_layernorm.weight,
        gate_up=gate_up,
        down=_weight(mlp.down_proj),
    )


def _fused(parts: tuple[torch.nn.Module, ...]) -> tuple[Tensor | torch.nn.Module, Tensor | None]:
    """One weight for sibling projections: their quantized group's product when --low-bit
    fused and quantized them (lowbit/apply.py), else their weights concatenated."""
    from .paged.fuse import ProjectionPart

    first = parts[0]
    if isinstance(first, ProjectionPart) and first.group.op is not None:
        return first.group.op, None  # the bias is the op's
    bias = None
    if first.bias is not None:
        bias = torch.cat([p.bias for p in parts])  # type: ignore[misc]
    return torch.cat([p.weight for p in parts]), bias  # type: ignore[misc]


def _weight(linear: torch.nn.Module) -> Tensor | torch.nn.Module:
    return linear.weight if type(linear) is torch.nn.Linear else linear  # type: ignore[return-value]


def _linear(x: Tensor, weight: Tensor | torch.nn.Module, bias: Tensor | None = None) -> Tensor:
    if isinstance(weight, Tensor):
        return F.linear(x, weight, bias)
    return weight(x)  # type: ignore[no-any-return]


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
