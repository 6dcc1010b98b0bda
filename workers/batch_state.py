"""The batch engine's bookkeeping: a job's run and its sequences (one a choice, each in a
cache slot), a launched step whose tokens come back asynchronously, and how a step's tokens
advance a run into text, log probabilities and finish reasons."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenrelay.queueing.messages import ChoiceDelta, Job, TokenLogprob

from .engine import EngineEvent, JobHandle
from .logprobs import Namer, Scored
from .text import TextTracker


@dataclass
class Seq:
    slot: int
    tracker: TextTracker
    length: int  # tokens in the cache once every launched step has run
    last: int = 0  # the newest token known on the host
    on_device: bool = False  # the next input is the last launched step's output
    finish: str | None = None
    history: int | None = None  # its row of the engine's TokenHistory (penalties.py)


@dataclass
class Run:
    job: Job
    handle: JobHandle
    prompt_len: int
    max_tokens: int
    generator: torch.Generator
    stop_ids: set[int]
    seqs: list[Seq] = field(default_factory=list)
    generated: int = 0
    completion_tokens: int = 0
    ended: bool = False
    prompt_scores: list[TokenLogprob] | None = None  # echo: sent with each first delta

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


def advance(
    run: Run, tokens: list[int], entries: list[TokenLogprob | None], max_context: int
) -> EngineEvent | None:
    """Take one new token per live choice; emit text, log probabilities (``entries``:
    each token's, None where not asked) and finish reasons."""
    run.generated += 1
    deltas = []
    for seq, token, entry in zip(run.seqs, tokens, entries, strict=True):
        if seq.finish is not None:
            continue
        run.completion_tokens += 1
        seq.last = token
        text = ""
        if token in run.stop_ids:
            text, seq.finish = seq.tracker.flush(), "stop"
        else:
            text = seq.tracker.add(token)
            if seq.tracker.stopped:
                seq.finish = "stop"
            elif run.generated >= run.max_tokens or seq.length + 1 >= max_context:
                text, seq.finish = text + seq.tracker.flush(), "length"
        first = run.generated == 1 and run.prompt_scores is not None
        if text or seq.finish or entry is not None or first:
            index = run.seqs.index(seq)
            delta = ChoiceDelta(index=index, text=text, finish_reason=seq.finish)
            delta.logprobs = None if entry is None else [entry]
            delta.prompt_logprobs = run.prompt_scores if first else None
            deltas.append(delta)
    if not deltas:
        return None
    return EngineEvent(deltas, run.prompt_len, run.completion_tokens)


def prompt_k(run: Run) -> int | None:
    return run.job.params.prompt_logprobs


def launch_scores(
    logits: torch.Tensor, picked: torch.Tensor, live: list[tuple[Run, Seq]]
) -> tuple[Scored, list[int], list[int]] | None:
    """Launched with the step: the log probabilities of the slots whose jobs ask, their
    slots and each one's top count."""
    want = [(s.slot, r.job.params.logprobs) for r, s in live if r.job.params.logprobs is not None]
    if not want:
        return None
    slots, ks = [w[0] for w in want], [w[1] or 0 for w in want]
    index = to_device(logits.device, slots)
    return Scored(logits[index], picked[index], max(ks)), slots, ks


class Step:
    """A launched decode step: its sampled tokens are copied to the host asynchronously."""

    def __init__(
        self,
        live: list[tuple[Run, Seq]],
        picked: torch.Tensor,
        scored: tuple[Scored, list[int], list[int]] | None = None,
    ) -> None:
        self.live = live
        self.picked = picked
        self.scored = scored
        if picked.is_cuda:
            self._host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
            self._host.copy_(picked, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = picked

    def tokens(self) -> list[int]:
        if self.picked.is_cuda:
            self._ready.synchronize()
        return self._host.tolist()

    def scores(self, namer: Namer) -> dict[int, TokenLogprob]:
        """Each asking slot's token with its log probability and top alternatives."""
        if self.scored is None:
            return {}
        scored, slots, ks = self.scored
        return {
            slot: namer.entry(token, lp, top[:k])
            for slot, k, (token, lp, top) in zip(slots, ks, scored.rows(), strict=True)
        }


def to_device(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:  # type: ignore[type-arg]
    """A small host list on the device without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
