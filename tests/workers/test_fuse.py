"""Fused q/k/v and gate/up projections: same outputs as the separate Linears, no memory
added, correct in any call order, and fusing twice changes nothing."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tokenrelay.workers.paged.fuse import ProjectionPart, fuse_projections


def _model() -> Qwen2ForCausalLM:  # Qwen2: q/k/v with biases
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
    )
    return Qwen2ForCausalLM(config).eval()


@torch.inference_mode()
def test_fused_model_gives_the_same_logits_with_the_same_weights() -> None:
    model = _model()
    ids = torch.randint(0, 300, (2, 9))
    before = model(ids).logits
    count = sum(p.numel() for p in model.parameters())
    assert fuse_projections(model) == 4  # two layers, each q/k/v and gate/up
    assert fuse_projections(model) == 0
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.v_proj, ProjectionPart)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == (
        attn.v_proj.weight.untyped_storage().data_ptr()
    )
    assert sum(p.numel() for p in model.parameters()) == count
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert attn.q_proj.group.state == {"input": None, "output": None}  # nothing kept alive


@torch.inference_mode()
def test_parts_called_out_of_order_or_on_other_inputs_stay_right() -> None:
    model = _model()
    mlp = model.model.layers[1].mlp
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    gate, up = mlp.gate_proj(x), mlp.up_proj(y)
    fuse_projections(model)
    torch.testing.assert_close(mlp.up_proj(y), up)  # up before gate: computes its own rows
    torch.testing.assert_close(mlp.gate_proj(x), gate)
    torch.testing.assert_close(mlp.up_proj(y), up)  # after gate, on another input
