"""The paged runner runs the model's own transformers modules: greedy tokens equal
``generate()`` for every architecture family, several prompts of different lengths sharing
each step, on tiny random-weight configs (float32, CPU here; CUDA in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenrelay.workers.paged import unsupported_reason
from tokenrelay.workers.paged.blocks import BlockManager, BlockTable
from tokenrelay.workers.paged.cache import CacheShape, KVCache
from tokenrelay.workers.paged.graphs import (
    PREFILL_BUCKETS,
    PREFILL_SEQS,
    PrefillGraph,
    prefill_bucket,
)
from tokenrelay.workers.paged.runner import ModelRunner, SeqInput

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 211,
    "max_position_embeddings": 512,
}

ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 10,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 10,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def tiny_model(name: str) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    # random weights are flat; sharpen them so greedy picks are stable under reordering
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def reference(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def paged_greedy(model: torch.nn.Module, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill all prompts in one pass, then decode them together, one block table each."""
    device = next(model.parameters()).device
    cache = KVCache(CacheShape.of(model), num_blocks=64, device=device, block_size=4)
    blocks = BlockManager(64, 4)
    runner = ModelRunner(model, cache, max_len=256)
    runner.capture_graphs(len(prompts))
    tables = [BlockTable() for _ in prompts]
    for table, p in zip(tables, prompts, strict=True):
        blocks.allocate(table, len(p) + 1)
    logits = runner.forward(
        [SeqInput(p, 0, t.blocks) for p, t in zip(prompts, tables, strict=True)]
    )
    outs = [[int(t)] for t in logits.argmax(-1)]
    lengths = [len(p) for p in prompts]
    for _ in range(steps - 1):
        for table, n in zip(tables, lengths, strict=True):
            blocks.allocate(table, n + 1)
        tokens = torch.tensor([o[-1] for o in outs], device=device)
        seqs = [SeqInput([], n, t.blocks) for n, t in zip(lengths, tables, strict=True)]
        picked = runner.decode(tokens, seqs).argmax(-1)
        for o, t in zip(outs, picked.tolist(), strict=True):
            o.append(t)
        lengths = [n + 1 for n in lengths]
    return outs


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_greedy_tokens_equal_generate(name: str) -> None:
    model = tiny_model(name)
    assert unsupported_reason(model) is None
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 211, (n,), generator=rng).tolist() for n in (5, 17, 9)]
    steps = 32
    want = [reference(model, p, steps) for p in prompts]
    got = paged_greedy(model, prompts, steps)
    assert got == want


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_greedy_tokens_equal_generate_on_cuda(name: str) -> None:
    """The same on CUDA in float32: Triton attention, decode steps replayed from graphs."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(name).cuda()
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 211, (n,), generator=rng).tolist() for n in (5, 17, 9)]
    want = [reference(model, p, 32) for p in prompts]
    assert paged_greedy(model, prompts, 32) == want


def test_a_prompt_prefilled_in_chunks_decodes_as_one_prefill() -> None:
    """Chunked prefill: the second chunk attends to the first through the cache."""
    model = tiny_model("llama")
    prompt = torch.randint(1, 211, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = KVCache(CacheShape.of(model), num_blocks=16, device=torch.device("cpu"), block_size=4)
    runner = ModelRunner(model, cache, max_len=128)
    table = BlockTable()
    BlockManager(16, 4).allocate(table, 24)
    runner.forward([SeqInput(prompt[:10], 0, table.blocks)])
    chunked = runner.forward([SeqInput(prompt[10:], 10, table.blocks)])
    whole = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(chunked[0], whole, rtol=1e-4, atol=1e-4)


def test_a_padded_prefill_pass_gives_the_eager_pass_logits() -> None:
    """The captured prefill pass's inputs (graphs.PrefillGraph): prompts and a chunk after
    a cached prefix, padded to the bucket with a sequence of length 0 and spare rows, give
    the logits and cache contents of the eager pass. Run through the buffers on the CPU
    (the CUDA graph itself is checked in test_gpu.py)."""
    model = tiny_model("gemma2")  # sliding window and softcap: the kernel's masks too
    rng = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 211, (23,), generator=rng).tolist()
    other = torch.randint(1, 211, (9,), generator=rng).tolist()
    results = []
    for padded in (False, True):
        cache = KVCache(CacheShape.of(model), 32, torch.device("cpu"), block_size=4)
        runner = ModelRunner(model, cache, max_len=128)
        blocks = BlockManager(32, 4)
        first, second = BlockTable(), BlockTable()
        blocks.allocate(first, 24)
        blocks.allocate(second, 10)
        runner.forward([SeqInput(prompt[:10], 0, first.blocks)])
        seqs = [SeqInput(prompt[10:], 10, first.blocks), SeqInput(other, 0, second.blocks)]
        if padded:
            static = PrefillGraph.buffers(32, 8, runner.max_blocks, runner.max_len, cache)
            static.fill(seqs, cache.block_size, cache.scratch_slot)
            logits = runner._run(
                static.ids[None], static.positions[None], static.keep, static.paged
            )
            logits = logits[: len(seqs)]
        else:
            logits = runner.forward(seqs)
        rows = [r for t in (first, second) for b in t.blocks for r in range(4 * b, 4 * b + 4)]
        kept = torch.stack([k.view(-1, *k.shape[2:])[rows] for k, _ in cache.layers])
        results.append((logits, kept))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_prefill_buckets_hold_the_pass_or_say_none() -> None:
    assert prefill_bucket(1, 1) == PREFILL_BUCKETS[0]
    assert prefill_bucket(129, 2) == 192
    assert prefill_bucket(PREFILL_BUCKETS[-1] + 1, 1) is None
    assert prefill_bucket(100, PREFILL_SEQS + 1) is None


def test_encoder_decoder_and_multimodal_models_are_refused_with_a_reason() -> None:
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    )
    reason = unsupported_reason(t5)
    assert reason is not None and "decoder-only" in reason
