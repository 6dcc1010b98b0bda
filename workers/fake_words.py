"""The fake engine's tiny language model, for API tests of the sampling extras.

A job that sets one of them (presence, frequency or repetition penalty, min_p, logit_bias,
min_tokens, include_stop_str_in_output) is answered from a vocabulary of eight tokens
whose logits never change: id 0 is EOS (no text), ids 1 to 7 are the words ``w1 `` to
``w7 ``, with logits ``LOGITS``. The real sampler (sampling.py, penalties.py) picks every
token, so an expectation worked out by hand from ``LOGITS`` holds through the API: plain
greedy is ``w1`` forever; a frequency penalty of 1.5 gives ``w1 w2 w1 w3``. Words of the
prompt of the form ``wK`` are its tokens (for the repetition penalty). Log probabilities
are LOGITS' log-softmax, whatever the adjustments (the raw ones, as vLLM's); echo scores
each prompt word ``wK`` by it too (any other word: -9999), the first word by none.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from tokenrelay.queueing.messages import ChoiceDelta, Job, SamplingParams, TokenLogprob

from .engine import EngineEvent, JobHandle
from .logprobs import FLOOR, Namer, Scored, prompt_entries

if TYPE_CHECKING:
    from torch import Tensor

EOS = 0
LOGITS = [2.0, 7.0, 6.0, 5.0, 4.0, 3.0, 1.0, 0.0]


def uses_words(params: SamplingParams) -> bool:
    return bool(params.given_extras)


def word(token: int) -> str:
    return "" if token == EOS else f"w{token} "


def prompt_tokens(text: str) -> list[int]:
    words = text.split()
    return [int(w[1:]) for w in words if w[:1] == "w" and w[1:].isdecimal() and int(w[1:]) < 8]


async def generate_words(
    job: Job, handle: JobHandle, prompt: str, max_tokens: int, delay: float
) -> None:
    import torch

    from .penalties import TokenHistory, check_logit_bias
    from .sampling import BatchSampler, make_generator
    from .text import TextTracker

    params = job.params
    check_logit_bias(params, len(LOGITS))
    n, cpu = params.n, torch.device("cpu")
    history = TokenHistory(len(LOGITS), cpu, rows=n)
    rows: list[int | None] = [history.acquire(prompt_tokens(prompt)) for _ in range(n)]
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
    generator = make_generator(params, cpu)
    seeded = generator if params.seed is not None else None
    sampler = BatchSampler(
        [params] * n,
        [seeded] * n,
        generator,
        cpu,
        history=history,
        rows=rows,
        stop_ids=[stop_ids] * n,
    )

    def decode(ids: list[int]) -> str:
        return "".join(word(t) for t in ids)

    namer = Namer(_Words())
    if params.prompt_logprobs is not None:
        scores = _prompt_scores(namer, prompt, params.prompt_logprobs)
        if max_tokens == 0:
            deltas = [ChoiceDelta(index=c, finish_reason="length") for c in range(n)]
            for d in deltas:
                d.prompt_logprobs = scores
            handle.put(EngineEvent(deltas, len(prompt.split()), 0))
            return

    trackers = [
        TextTracker(decode, params.stop, params.include_stop_str_in_output, params.min_tokens)
        for _ in range(n)
    ]
    finish: list[str | None] = [None] * n
    used, logits = 0, torch.tensor([LOGITS] * n)
    for step in range(max_tokens):
        if delay:
            await asyncio.sleep(delay)
        deltas = []
        picked = sampler(logits)
        entries = _entries(namer, logits, picked, params.logprobs)
        for c, token in enumerate(picked.tolist()):
            if finish[c] is not None:
                continue
            used += 1
            if token in stop_ids:
                text, finish[c] = trackers[c].flush(), "stop"
            else:
                text = trackers[c].add(token)
                if trackers[c].stopped:
                    finish[c] = "stop"
                elif step == max_tokens - 1:
                    text, finish[c] = text + trackers[c].flush(), "length"
            if text or finish[c] or entries[c] is not None or step == 0:
                delta = ChoiceDelta(index=c, text=text, finish_reason=finish[c])
                delta.logprobs = None if entries[c] is None else [entries[c]]
                if step == 0 and params.prompt_logprobs is not None:
                    delta.prompt_logprobs = scores
                deltas.append(delta)
        if deltas:
            handle.put(EngineEvent(deltas, len(prompt.split()), used))
        if all(finish):
            return


class _Words:
    """What Namer needs of a tokenizer: the words' decode."""

    def decode(self, ids: list[int]) -> str:
        return "".join(word(t) for t in ids)


def _entries(namer: Namer, logits: Tensor, picked: Tensor, k: int | None) -> list[Any]:
    if k is None:
        return [None] * len(picked)
    rows = Scored(logits, picked, k).rows()
    return [namer.entry(token, lp, top) for token, lp, top in rows]


def _prompt_scores(namer: Namer, prompt: str, k: int) -> list[TokenLogprob]:
    import torch

    ids = [int(w[1:]) if w in _IDS else EOS for w in prompt.split()]
    out = prompt_entries(namer, torch.tensor([LOGITS] * len(ids)), ids, k)
    for entry, w, token in zip(out, prompt.split(), ids, strict=True):
        entry.token, entry.bytes = w + " ", list((w + " ").encode())
        if token == EOS and entry.logprob is not None:
            entry.logprob = FLOOR
    return out


_IDS = {f"w{i}" for i in range(1, len(LOGITS))}
