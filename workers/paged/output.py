"""From sampled token ids to what a job's stream gets: each choice's new text (stop ids,
stop strings, max_tokens and the context's end honoured to the token) as one event a job
for a launched run of decode steps, and the tokenizer's fastest faithful decode."""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from tokenrelay.queueing.messages import ChoiceDelta, TokenLogprob

from ..engine import EngineEvent
from .blocks import BlockManager
from .sequences import Run, Seq


def advance(
    run: Run,
    tokens: list[list[int]],
    max_context: int,
    blocks: BlockManager,
    entries: list[list[TokenLogprob] | None] | None = None,
) -> EngineEvent | None:
    """Take each live choice's new tokens (one a step, ``tokens[index]``); emit their
    text, log probabilities (``entries[index]``, one a step, where asked) and finish
    reasons. A choice's first delta carries the prompt's scores (echo)."""
    steps = max(map(len, tokens), default=0)
    deltas = []
    first = run.generated == 0 and run.prompt_scores is not None
    for index, (seq, new) in enumerate(zip(run.seqs, tokens, strict=True)):
        if seq.finish is not None or not new:
            continue
        text, taken = take(run, seq, new, max_context)
        run.completion_tokens += taken
        scores = entries[index] if entries else None
        if text or seq.finish or scores is not None or first:
            delta = ChoiceDelta.model_construct(
                index=index,
                text=text,
                finish_reason=seq.finish,
                logprobs=None if scores is None else scores[:taken],
                prompt_logprobs=run.prompt_scores if first else None,
            )
            deltas.append(delta)
        if seq.finish is not None:
            blocks.free(seq.table)
    run.generated += steps
    if not deltas:
        return None
    return EngineEvent(deltas, run.prompt_len, run.completion_tokens)


def scored_only(run: Run, blocks: BlockManager) -> EngineEvent:
    """A job of echo's scoring alone (max_tokens 0): the prompt's entries, nothing more."""
    for seq in run.seqs:
        seq.finish = "length"
        blocks.free(seq.table)
    deltas = [
        ChoiceDelta(index=i, finish_reason="length", prompt_logprobs=run.prompt_scores)
        for i in range(len(run.seqs))
    ]
    return EngineEvent(deltas, run.prompt_len, 0)


def take(run: Run, seq: Seq, new: list[int], max_context: int) -> tuple[str, int]:
    """Append ``new`` (one token a step from step ``run.generated + 1`` on) to ``seq``
    up to where it finishes; returns the text to send and the tokens taken."""
    kept = []
    for j, token in enumerate(new):
        kept.append(token)
        if token in run.stop_ids:
            seq.finish = "stop"
        elif run.generated + j + 1 >= run.max_tokens or len(seq.tokens) + len(kept) >= max_context:
            seq.finish = "length"
        if seq.finish:
            break
    seq.tokens += kept
    seq.last = kept[-1]
    tracker = seq.tracker
    text = ""
    if tracker.stop:  # a stop string may end the text at any token: one at a time
        for j, token in enumerate(kept):
            if token in run.stop_ids:
                return text + tracker.flush(), j + 1
            text += tracker.add(token)
            if tracker.stopped:
                seq.finish = "stop"
                del seq.tokens[len(seq.tokens) - len(kept) + j + 1 :]
                seq.last = token
                return text, j + 1
    else:
        text = tracker.add_many(kept[:-1] if seq.finish == "stop" else kept)
    if seq.finish:
        text += tracker.flush()
    return text, len(kept)


def fast_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str] | None:
    """The Rust tokenizer's own decode, where it gives what transformers' wrapper gives:
    a fifth of the cost per call (1 against 5 us), paid twice a token for every sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    decode = backend.decode

    def run(ids: list[int]) -> str:
        return decode(ids, skip_special_tokens=True)  # type: ignore[no-any-return]

    return run
