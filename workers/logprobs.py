"""Log probabilities of sampled and prompt tokens, as vLLM reports them by default
(``logprobs_mode="raw_logprobs"``): the log-softmax of the model's raw logits, before
logit_bias, penalties, temperature and top-k/top-p. What a token is called (its text and
bytes) is the tokenizer's, cached per id."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenrelay.queueing.messages import Job, TokenLogprob, TopLogprob

from .engine import InvalidRequest

if TYPE_CHECKING:
    import torch

FLOOR = -9999.0  # OpenAI's stand-in for a log probability of -inf (JSON has no -inf)


def wants_logprobs(job: Job) -> bool:
    p = job.params
    return p.logprobs is not None or p.prompt_logprobs is not None or p.max_tokens == 0


def refuse_logprobs(job: Job, engine: str) -> None:
    """For an engine that does not score tokens: a 400 naming what it cannot do, never an
    answer without what was asked."""
    p = job.params
    if p.logprobs is not None or p.prompt_logprobs is not None:
        field = "logprobs" if p.logprobs is not None else "echo"
        raise InvalidRequest(
            f"log probabilities are not supported by this worker's {engine} engine; "
            "serve the model with the batch, paged or hf engine (--engine batch|paged|hf) or "
            "leave logprobs out",
            code="unsupported_value",
            param=field,
        )
    if p.max_tokens == 0:
        raise InvalidRequest(
            f"max_tokens=0 is not supported by this worker's {engine} engine",
            code="unsupported_value",
            param="max_tokens",
        )


class Scored:
    """The raw log probabilities of some rows' chosen tokens and of their top ``k``,
    computed on the device when launched and read on the host later (``entries``)."""

    def __init__(self, logits: torch.Tensor, chosen: torch.Tensor, k: int) -> None:
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1)
        self.chosen = chosen
        self.logprob = lp.gather(-1, chosen[:, None])[:, 0]
        self.top = torch.topk(lp, k, dim=-1) if k > 0 else None

    def rows(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """Per row: the chosen id, its log probability, the top (id, logprob) pairs."""
        ids, lps = self.chosen.tolist(), self.logprob.tolist()
        if self.top is None:
            return [(i, lp, []) for i, lp in zip(ids, lps, strict=True)]
        top_v, top_i = self.top.values.tolist(), self.top.indices.tolist()
        return [
            (i, lp, list(zip(ti, tv, strict=True)))
            for i, lp, ti, tv in zip(ids, lps, top_i, top_v, strict=True)
        ]


class Namer:
    """Token ids as OpenAI names them: the token's text and its UTF-8 bytes."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder = _byte_decoder(tokenizer)

    def name(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._name(token_id)
        return got

    def _name(self, token_id: int) -> tuple[str, list[int]]:
        decode: Callable[..., str] = self.tokenizer.decode  # type: ignore[attr-defined]
        text = decode([token_id])
        raw = text.encode("utf-8")
        if self._byte_decoder is not None:  # byte-level BPE: a part of a character too
            piece = self.tokenizer.convert_ids_to_tokens(token_id)  # type: ignore[attr-defined]
            if isinstance(piece, str) and all(c in self._byte_decoder for c in piece):
                raw = bytes(self._byte_decoder[c] for c in piece)
        return text, list(raw)

    def top(self, pairs: list[tuple[int, float]]) -> list[TopLogprob]:
        out = []
        for token_id, lp in pairs:
            text, raw = self.name(token_id)
            out.append(TopLogprob(token=text, logprob=max(lp, FLOOR), bytes=raw))
        return out

    def entry(
        self, token_id: int, lp: float | None, pairs: list[tuple[int, float]]
    ) -> TokenLogprob:
        text, raw = self.name(token_id)
        value = None if lp is None else max(lp, FLOOR)
        return TokenLogprob(token=text, logprob=value, bytes=raw, top=self.top(pairs))


def prompt_entries(
    namer: Namer, logits: torch.Tensor, ids: list[int], k: int
) -> list[TokenLogprob]:
    """Each prompt token scored by the logits of the position before it ((len, vocab)
    logits of every position); the first has no log probability."""
    import torch

    if len(ids) < 2:
        return [namer.entry(ids[0], None, [])] if ids else []
    scored = Scored(logits[: len(ids) - 1], torch.tensor(ids[1:], device=logits.device), k)
    rows = scored.rows()
    return [namer.entry(ids[0], None, [])] + [namer.entry(i, lp, top) for i, lp, top in rows]


def _byte_decoder(tokenizer: object) -> dict[str, int] | None:
    """The byte-level BPE's character-to-byte map, when the tokenizer is one (GPT-2's,
    SmolLM2's): it spells every token's bytes, a character's part included."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or "ByteLevel" not in type(decoder).__name__ + repr(decoder):
        return None
    return {c: b for b, c in _bytes_to_unicode().items()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}
