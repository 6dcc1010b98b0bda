"""Benchmark models with no download: Llama shapes with random weights, and a tokenizer
made in code whose every id decodes to one short word. And the bench's prompts, whose
length is counted in the served model's tokens."""

from __future__ import annotations

import functools
import random
from pathlib import Path

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
    """A prompt of exactly ``length`` tokens of the synthetic tokenizer (of it only)."""
    return " ".join(word(100 + (salt * 7919 + i * 31) % 100000) for i in range(length))


SYNTHETIC = "synthetic"  # a tokenizer source: the synthetic tokenizer, as random:* serve


def load_tokenizer(source: str):  # type: ignore[no-untyped-def]
    """The tokenizer a worker serves for ``--model-path source`` (a folder, a .gguf file, or
    random:*, whose tokenizer is the synthetic one; so is ``synthetic``'s)."""
    if source == SYNTHETIC or source.startswith("random:"):
        return synthetic_tokenizer()
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


class Prompts:
    """Prompts that encode to an exact number of tokens, the same for the same salt."""

    def __init__(self, tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)

    def count(self, text: str) -> int:
        # as workers/prompts.py encodes a completion's prompt: special tokens (a BOS) count
        return len(self.tokenizer(text)["input_ids"])

    def text(self, length: int, salt: int = 0) -> str:
        """Random vocabulary words, added or dropped until the text encodes to ``length``
        tokens (a word can take two tokens, so the count is checked, not assumed)."""
        rng = random.Random(salt)
        words: list[str] = []
        for _ in range(200):
            text = " ".join(words)
            n = self.count(text)
            if n == length:
                return text
            if n < length:
                words += [self._word(rng) for _ in range(length - n)]
            elif words:
                del words[max(0, len(words) - (n - length)) :]
            else:
                break  # even the empty prompt is longer (a BOS and more)
        raise ValueError(f"found no prompt of exactly {length} tokens (salt {salt})")

    def _word(self, rng: random.Random) -> str:
        for _ in range(10_000):
            i = rng.randrange(len(self.tokenizer))
            piece = "" if i in self.special else self.tokenizer.decode([i]).strip()
            if piece.isascii() and piece.isalnum():
                return piece
        raise ValueError("the tokenizer has no plain ASCII words")


@functools.lru_cache(maxsize=4)
def prompts_for(source: str) -> Prompts:
    """:class:`Prompts` in the tokens of ``source`` (see :func:`load_tokenizer`), loaded once."""
    return Prompts(load_tokenizer(source))
