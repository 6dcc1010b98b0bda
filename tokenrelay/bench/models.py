"""Benchmark models with no download: Llama shapes with random weights, and a tokenizer
made in code whose every id decodes to one short word."""

from __future__ import annotations

import torch

SHAPES = {
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
    },
    "8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
    },
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
    },
}
VOCAB = 128256


def word(i: int) -> str:
    return f"w{i}"


def synthetic_tokenizer(vocab: int = VOCAB):  # type: ignore[no-untyped-def]
    """A word-level tokenizer: ``w{i}`` <-> id i, words split on spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {word(i): i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(table, unk_token=word(0)))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=word(vocab - 1), unk_token=word(0)
    )


def random_llama(shape: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):  # type: ignore[no-untyped-def]
    """A LlamaForCausalLM of ``shape`` with random weights, built on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=131072,  # Llama 3.1
        rope_theta=500000.0,
        tie_word_embeddings=False,
        **SHAPES[shape],
    )
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def prompt_words(length: int, salt: int = 0) -> str:
    """A prompt of exactly ``length`` synthetic tokens."""
    return " ".join(word(100 + (salt * 7919 + i * 31) % 100000) for i in range(length))
