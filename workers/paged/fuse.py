"""One GEMM for sibling projections of the same input: q/k/v, and gate/up.

The transformers modules call ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after another:
three reads of the input and three GEMMs, two of them small (1,024 of 4,096 columns in
Llama 3 8B), which at decode batch sizes run at a third of the bandwidth a large one gets
(bench/step_breakdown.py: at batch 1 a layer's GEMMs take 133.7 us separate, 115.7 us fused).
Here the siblings' weights are concatenated into one matrix (the old ones freed, so no
memory is added) and each sibling becomes a view of its rows. The first sibling to run
computes the whole product; the others take their columns of it when they get the same
input tensor, and compute their own rows otherwise, so any call order stays correct.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedProjection:
    """The concatenated weight of a group, and the last product while its parts read it."""

    def __init__(self, weight: Tensor, bias: Tensor | None, sizes: list[int]) -> None:
        self.weight: Tensor | None = weight
        self.bias = bias
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.state: dict[str, Tensor | None] = {"input": None, "output": None}
        # the group's product when its weight is stored another way (a quantized Linear,
        # lowbit/apply.py); the float weight is then gone
        self.op: nn.Module | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.op is not None:
            return self.op(x)  # type: ignore[no-any-return]
        assert self.weight is not None
        return nn.functional.linear(x, self.weight, self.bias)


class ProjectionPart(nn.Module):
    """One sibling: a Linear whose weight is a view of the group's rows."""

    def __init__(self, group: FusedProjection, index: int) -> None:
        super().__init__()
        begin, end = group.offsets[index], group.offsets[index + 1]
        self.group = group
        self.index = index
        self.begin, self.end = begin, end
        self.last = index == len(group.offsets) - 2
        assert group.weight is not None
        self.in_features = group.weight.shape[1]
        self.out_features = end - begin
        self.weight = nn.Parameter(group.weight[begin:end], requires_grad=False)
        bias = group.bias[begin:end] if group.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        group, state = self.group, self.group.state
        if self.index == 0:
            state["input"] = x
            state["output"] = group(x)
        elif state["input"] is not x:
            if self.weight is None:  # quantized: the group's product, our columns of it
                return group(x)[..., self.begin : self.end]
            return nn.functional.linear(x, self.weight, self.bias)
        out = state["output"]
        assert out is not None
        if self.last:
            state["input"] = state["output"] = None
        return out[..., self.begin : self.end]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused"


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of plain Linears in place; returns how many."""
    fused = 0
    for module in list(model.modules()):
        if hasattr(module, "_hf_hook"):  # accelerate moves this module's weights: leave it
            continue
        for names in GROUPS:
            if _fuse_group(module, names):
                fused += 1
                if torch.cuda.is_available():
                    # hand the old weights' memory back now: left in the allocator's cache,
                    # the next layers' fused weights would be cut out of it, and the pieces
                    # left over could not be released for the KV cache (r6 sized its cache
                    # 4.6% smaller than r5, before this)
                    torch.cuda.empty_cache()
    if fused:
        log.info("fused %d projection groups (q/k/v, gate/up) into one GEMM each", fused)
    return fused


def _fuse_group(module: nn.Module, names: tuple[str, ...]) -> bool:
    parts = [getattr(module, name, None) for name in names]
    if not _fusable(parts):
        return False
    linears: list[nn.Linear] = parts  # type: ignore[assignment]
    weight = torch.cat([p.weight.detach() for p in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([p.bias.detach() for p in linears])  # type: ignore[union-attr]
    group = FusedProjection(weight, bias, [p.out_features for p in linears])
    for index, name in enumerate(names):
        setattr(module, name, ProjectionPart(group, index))
    return True


def _fusable(parts: list[object]) -> bool:
    if not all(type(p) is nn.Linear for p in parts):
        return False
    linears: list[nn.Linear] = parts  # type: ignore[assignment]
    first = linears[0]
    return all(
        p.in_features == first.in_features
        and p.weight.dtype == first.weight.dtype
        and p.weight.device == first.weight.device
        and p.weight.device.type != "meta"
        and (p.bias is None) == (first.bias is None)
        and not hasattr(p, "_hf_hook")
        for p in linears
    )
