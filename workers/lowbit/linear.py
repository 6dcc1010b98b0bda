"""Quantized weights and the Linear that multiplies by them in their stored form.

CPU kernels are torch's own (no extra package): ``_weight_int8pack_mm`` for 8-bit weights
with a scale per output channel, and ``_weight_int4pack_mm_for_cpu`` for 4-bit weights in
groups, dequantized as ``(q - 8) * scale + zero`` inside the kernel. Both are fast with
bfloat16 activations and slow with float32 ones (bench/cpu_lowbit_kernels.py), so the input
is cast to bfloat16 for the product and the output back.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .formats import FORMATS, LowBit

DEQUANTIZE_ROWS = 64  # rows from which a product dequantizes the weight first (prefill)
COMPUTE = torch.bfloat16  # the activations' dtype inside the CPU kernels


class Int8Weight:
    """int8 (N, K) with a float scale per output row: w = q * scale."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        self.q, self.scale = q, scale

    @classmethod
    def quantize(cls, w: Tensor, fmt: LowBit) -> Int8Weight:
        w = w.float()
        scale = w.abs().amax(1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scale.to(COMPUTE))

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    @classmethod
    def cat(cls, parts: list[Int8Weight]) -> Int8Weight:
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))

    def dequantize(self) -> Tensor:
        return self.q.float() * self.scale.float()[:, None]


class Int4Weight:
    """4-bit values packed two a byte (torch's CPU layout, (N, K / 2)) with a scale and a
    zero per group of ``group`` weights of a row: w = (q - 8) * scale + zero, q in 0..15.
    Symmetric: zero is 0 and q - 8 spans -8..7; asymmetric: zero is the group's minimum
    plus 8 scales, and q spans the group's range."""

    def __init__(self, packed: Tensor, scales_zeros: Tensor, group: int) -> None:
        self.packed, self.scales_zeros, self.group = packed, scales_zeros, group

    @classmethod
    def quantize(cls, w: Tensor, fmt: LowBit) -> Int4Weight:
        n, k = w.shape
        g = w.float().view(n, k // fmt.group, fmt.group)
        if fmt.symmetric:
            # as GGUF's Q4_0: the value of largest magnitude maps to -8 exactly, so the
            # full range of 16 levels is used (absmax / 7 would leave -8 unused)
            extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]
            scale = extreme / -8
            scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
            q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
            zero = torch.zeros_like(scale)
        else:
            low, high = g.amin(-1), g.amax(-1)
            scale = (high - low).clamp(min=1e-8) / 15
            q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15)
            zero = low + 8 * scale
        return cls.from_values(q.view(n, k).to(torch.int32), scale, zero, fmt.group)

    @classmethod
    def from_values(cls, q: Tensor, scale: Tensor, zero: Tensor, group: int) -> Int4Weight:
        """From unpacked values (N, K) in 0..15 and (N, K / group) scales and zeros."""
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
        return cls(packed, scales_zeros.to(COMPUTE), group)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group, self.scales_zeros
        )

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * self.scales_zeros.element_size()

    @classmethod
    def cat(cls, parts: list[Int4Weight]) -> Int4Weight:
        return cls(
            torch.cat([p.packed for p in parts]),
            torch.cat([p.scales_zeros for p in parts], dim=1),
            parts[0].group,
        )

    def dequantize(self) -> Tensor:
        n = self.packed.shape[0]
        k = self.scales_zeros.shape[0] * self.group
        q = unpack_int4(self.packed, n, k)
        if q is None:  # a layout this torch build packs differently: through the kernel
            eye = torch.eye(k, dtype=COMPUTE)
            return self.matmul(eye).float().T.contiguous().view(n, k)
        scale, zero = self.scales_zeros.float().unbind(-1)  # (K / group, N) each
        groups = q.view(n, k // self.group, self.group).float() - 8
        w = groups * scale.T[..., None] + zero.T[..., None]
        return w.view(n, k)


@functools.cache
def _int4_block() -> int | None:
    """Rows a block of torch's CPU int4 layout interleaves (it depends on the CPU's vector
    width): found by packing a probe and checking each candidate's layout against it."""
    n, k = 128, 64
    probe = torch.arange(n * k, dtype=torch.int32).view(n, k) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (16, 32, 64, 128):
        got = _unpack(packed, n, k, block)
        if got is not None and torch.equal(got, probe):
            return block
    return None


def _unpack(packed: Tensor, n: int, k: int, block: int) -> Tensor | None:
    """Inverse of the CPU packing: block rows j and j + block / 2 share a byte (low and
    high nibble), K-major within a block of rows."""
    if n % block:
        return None
    half = block // 2
    raw = packed.reshape(n // block, k, half)  # (blocks, K, half) bytes
    low, high = raw & 15, raw >> 4
    rows = torch.cat([low, high], dim=2)  # (blocks, K, block): row r of the block at [.., r]
    return rows.permute(0, 2, 1).reshape(n, k).to(torch.int32)


def unpack_int4(packed: Tensor, n: int, k: int) -> Tensor | None:
    """(N, K) values 0..15 of a packed weight, or None for a layout not recognised."""
    block = _int4_block()
    return None if block is None else _unpack(packed, n, k, block)


class DenseWeight:
    """A float weight in ``dtype`` (the benchmark's baseline)."""

    def __init__(self, w: Tensor) -> None:
        self.w = w

    @classmethod
    def quantize(cls, w: Tensor, fmt: LowBit) -> DenseWeight:
        return cls(w.to(getattr(torch, fmt.dtype or "float32")))

    def matmul(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.w)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    @classmethod
    def cat(cls, parts: list[DenseWeight]) -> DenseWeight:
        return cls(torch.cat([p.w for p in parts]))

    def dequantize(self) -> Tensor:
        return self.w.float()


QuantWeight = Int8Weight | Int4Weight | DenseWeight


def weight_kind(fmt: LowBit) -> type[Int8Weight] | type[Int4Weight] | type[DenseWeight]:
    if fmt.dtype is not None or fmt.name == "float32":
        return DenseWeight
    return {8: Int8Weight, 4: Int4Weight}[fmt.bits]


def can_quantize(w: Tensor, fmt: LowBit) -> bool:
    """Whether the kernel takes this shape (rows and groups whole)."""
    n, k = w.shape
    if fmt.bits == 4:
        return k % fmt.group == 0 and k % 2 == 0 and n % 8 == 0
    return True


class QuantLinear(nn.Module):
    """A Linear whose weight is quantized; the input keeps its dtype outside."""

    def __init__(self, weight: QuantWeight, fmt: str, out_features: int, in_features: int,
                 bias: Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        self.qweight = weight
        self.format = fmt
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        dense = isinstance(self.qweight, DenseWeight)
        if flat.shape[0] >= DEQUANTIZE_ROWS and not dense:
            # a prefill: the low-bit kernels are slow at many rows (they dequantize per
            # tile and multiply in bfloat16); the weight dequantized once and a float
            # GEMM are faster there
            w = self.qweight.dequantize().to(x.dtype)
            return nn.functional.linear(x, w, self.bias)
        kernel_dtype = self.qweight.w.dtype if dense else COMPUTE  # type: ignore[union-attr]
        out = self.qweight.matmul(flat.to(kernel_dtype)).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.qweight.nbytes()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}"


def quantize_weight(w: Tensor, name: str, bias: Tensor | None = None) -> QuantLinear:
    fmt = FORMATS.get(name) or LowBit(name, "float32 weights", ("cpu",), "float32", 32)
    kind = weight_kind(fmt)
    return QuantLinear(kind.quantize(w, fmt), name, w.shape[0], w.shape[1], bias)


def cat_linears(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear for sibling projections of one input, rows stacked."""
    first = parts[0]
    weight = type(first.qweight).cat([p.qweight for p in parts])  # type: ignore[arg-type]
    bias = None
    if first.bias is not None:
        bias = torch.cat([p.bias for p in parts])  # type: ignore[misc]
    out = sum(p.out_features for p in parts)
    return QuantLinear(weight, first.format, out, first.in_features, bias)


class QuantEmbedding(nn.Module):
    """An embedding table in 8 bits (a scale per token's row); with tied weights the same
    table is the LM head's (rows of ``qweight`` are tokens either way)."""

    def __init__(self, weight: Int8Weight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.q.shape
        self.padding_idx = padding_idx

    def forward(self, ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        rows = self.qweight.q[ids].to(dtype)
        return rows * self.qweight.scale[ids].to(dtype)[..., None]

    def weight_bytes(self) -> int:
        return self.qweight.nbytes()
