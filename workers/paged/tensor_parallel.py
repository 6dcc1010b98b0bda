"""Tensor parallelism's weight split (Megatron's): each rank keeps 1/N of every layer.

Attention: q_proj, k_proj and v_proj are column-parallel (rank r keeps heads r*H/N up to
(r+1)*H/N and the kv heads they read), o_proj is row-parallel (the columns those heads
write) and all-reduces its partial sums. The MLP the same way: gate_proj and up_proj
column-parallel, down_proj row-parallel, one all-reduce. Two all-reduces a layer, nothing
else crosses ranks: norms, rotary, attention over the rank's own heads, and the paged KV
cache (CacheShape.of divides the kv heads by ``tensor_parallel``) all stay local.

The split happens before fuse.py concatenates q/k/v and gate/up, so each rank fuses its own
shards into one GEMM, as a single GPU does. Embeddings and the LM head stay whole on every
rank: each computes the same logits, and only rank 0 samples from them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

# the group the passes' collectives run in (None: the default group); ranks.py sets one
# whose timeout is a step's, not start-up's
GROUP: list[dist.ProcessGroup | None] = [None]

COLUMNS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ROWS = ("o_proj", "down_proj")
# head counts some attention modules keep beside their config
HEAD_ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_attention_heads")


class RowParallelLinear(nn.Module):
    """A Linear over this rank's input columns: partial sums, all-reduced, then the bias."""

    def __init__(self, linear: nn.Linear, rank: int, world: int) -> None:
        super().__init__()
        width = linear.in_features // world
        self.in_features, self.out_features = width, linear.out_features
        self.weight = nn.Parameter(
            linear.weight.detach()[:, rank * width : (rank + 1) * width].clone(),
            requires_grad=False,
        )
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.linear(x, self.weight)
        dist.all_reduce(out, group=GROUP[0])
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (a shard), out_features={self.out_features}"


def split_reason(model: nn.Module, world: int) -> str | None:
    """Why ``model`` cannot be split over ``world`` ranks, or None."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for name, count in (
        ("attention heads", heads),
        ("key/value heads", kv_heads),
        ("MLP columns (intermediate_size)", getattr(config, "intermediate_size", 0)),
    ):
        if count % world:
            return f"its {count} {name} do not split evenly over {world} ranks"
    layers = config.num_hidden_layers
    found = _count(model)
    if found != (layers, layers):
        return (
            "tensor parallelism splits separate q/k/v/o and gate/up/down projections; "
            f"{type(model).__name__} has {found[0]} such attention blocks and {found[1]} "
            f"such MLPs for {layers} layers"
        )
    return None


def split_model(model: nn.Module, rank: int, world: int) -> None:
    """Keep rank ``rank``'s shard of every attention block and MLP, in place."""
    reason = split_reason(model, world)
    if reason is not None:
        raise SystemExit(f"--tensor-parallel-size {world}: {type(model).__name__}: {reason}")
    for module in list(model.modules()):
        for names in COLUMNS:
            if all(_linear(module, n) for n in names):
                for name in names:
                    setattr(module, name, _column_shard(getattr(module, name), rank, world))
        for name in ROWS:
            if _linear(module, name):
                setattr(module, name, RowParallelLinear(getattr(module, name), rank, world))
        if isinstance(getattr(module, "o_proj", None), RowParallelLinear):
            for attribute in HEAD_ATTRIBUTES:
                value = getattr(module, attribute, None)
                if isinstance(value, int):
                    setattr(module, attribute, value // world)
    model.tensor_parallel = world  # type: ignore[assignment]


def shards(model: nn.Module) -> int:
    """The ranks ``model``'s layers are split over (1: not split)."""
    return int(getattr(model, "tensor_parallel", 1))


def _column_shard(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    rows = linear.out_features // world
    keep = slice(rank * rows, (rank + 1) * rows)
    shard = nn.Linear(
        linear.in_features,
        rows,
        bias=linear.bias is not None,
        device="meta",
        dtype=linear.weight.dtype,
    )
    shard.weight = nn.Parameter(linear.weight.detach()[keep].clone(), requires_grad=False)
    if linear.bias is not None:
        shard.bias = nn.Parameter(linear.bias.detach()[keep].clone(), requires_grad=False)
    return shard


def _linear(module: nn.Module, name: str) -> bool:
    return type(getattr(module, name, None)) is nn.Linear


def _count(model: nn.Module) -> tuple[int, int]:
    attention = mlp = 0
    for module in model.modules():
        names = [n for group in COLUMNS for n in group] + list(ROWS)
        present = {n for n in names if isinstance(getattr(module, n, None), nn.Module)}
        attention += {"q_proj", "k_proj", "v_proj", "o_proj"} <= present
        mlp += {"gate_proj", "up_proj", "down_proj"} <= present
    return attention, mlp


@torch.inference_mode()
def same_everywhere(value: int, op: dist.ReduceOp.RedOpType = dist.ReduceOp.MIN) -> int:
    """``value`` reduced over every rank (the KV cache's blocks: the smallest GPU's)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=op, group=GROUP[0])
    return int(t.item())
