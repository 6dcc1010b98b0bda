"""The engine's bookkeeping: a request (``Run``) with its ``n`` sequences, and a launched
decode step whose tokens are still on their way to the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenrelay.queueing.messages import Job, TokenLogprob

from ..engine import JobHandle
from ..text import TextTracker
from .blocks import BlockTable


@dataclass
class Seq:
    table: BlockTable
    tracker: TextTracker
    tokens: list[int]  # the prompt and every token sampled so far (a preemption recomputes them)
    length: int = 0  # tokens in the cache once every launched step has run
    last: int = 0  # the newest token known on the host: the next step's input
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
    fresh: bool = True  # not prefilled yet
    prompt_scores: list[TokenLogprob] | None = None  # echo: sent with each first delta

    @property
    def live_seqs(self) -> list[Seq]:
        return [s for s in self.seqs if s.finish is None]

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


class Step:
    """A launched run of decode steps: their (steps, B) sampled tokens are copied to the
    host asynchronously."""

    def __init__(
        self, live: list[tuple[Run, Seq]], picked: torch.Tensor, scores: Any = None
    ) -> None:
        self.live = live
        self.picked = picked
        self.scores = scores  # scoring.StepScores of the rows that ask, or None
        if picked.is_cuda:
            self._host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
            self._host.copy_(picked, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = picked

    def tokens(self) -> list[list[int]]:
        """(steps, B) token ids."""
        if self.picked.is_cuda:
            self._ready.synchronize()
        return self._host.tolist()  # type: ignore[no-any-return]
