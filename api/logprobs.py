"""Log probabilities in OpenAI's two shapes.

Chat: ``{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}``.
Completions (the legacy API): ``{tokens, token_logprobs, top_logprobs, text_offset}``,
where ``top_logprobs`` maps each alternative's text to its log probability (the sampled
token's always among them, as vLLM's), a prompt's first token has null in both, and
``text_offset`` is where each token starts in the choice's returned text (the echoed
prompt's included), counted from the tokens' texts as vLLM does.
"""

from __future__ import annotations

from typing import Any

from tokenrelay.queueing.messages import TokenLogprob


def chat(entries: list[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": e.bytes,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top
                ],
            }
            for e in entries
        ]
    }


def completion(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``entries`` as the legacy object, the first token at ``offset`` characters."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(e.token)
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_alternatives(e) for e in entries],
        "text_offset": offsets,
    }


def text_length(entries: list[TokenLogprob]) -> int:
    return sum(len(e.token) for e in entries)


def _alternatives(entry: TokenLogprob) -> dict[str, float] | None:
    if entry.logprob is None:  # a prompt's first token: nothing before it to score it
        return None
    top = {t.token: t.logprob for t in entry.top}
    top.setdefault(entry.token, entry.logprob)
    return top
