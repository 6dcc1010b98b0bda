"""Queue chunks rendered as OpenAI objects: chat and text completions, streamed or whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenrelay.queueing.messages import ChoiceDelta, Chunk, Job, TokenLogprob, Usage

from . import logprobs


@dataclass
class Formatter:
    job: Job
    include_usage: bool = False
    # a stream's place in each choice: echoed yet, and the completions' text_offset
    _echoed: set[int] = field(default_factory=set)
    _offset: dict[int, int] = field(default_factory=dict)

    @property
    def chat(self) -> bool:
        return self.job.kind == "chat"

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.job.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.job.created,
            "model": self.job.model,
            "choices": choices,
        }
        if self.chat:
            body["system_fingerprint"] = None
        if self.include_usage:
            body["usage"] = None
        body.update(extra)
        return body

    def _choice(
        self,
        index: int,
        text: str | None,
        finish: str | None,
        role: bool = False,
        scores: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": scores, "finish_reason": finish}
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": scores, "finish_reason": finish}

    def _scores(self, entries: list[TokenLogprob], index: int) -> dict[str, Any] | None:
        """The logprobs object of ``entries`` (choice ``index``'s next tokens), if asked."""
        if self.job.params.logprobs is None:
            return None
        if self.chat:
            return logprobs.chat(entries)
        offset = self._offset.get(index, 0)
        self._offset[index] = offset + logprobs.text_length(entries)
        return logprobs.completion(entries, offset)

    def opening(self) -> list[dict[str, Any]]:
        """The role chunk of each choice (chat only)."""
        if not self.chat:
            return []
        return [
            self._chunk([self._choice(i, None, None, role=True)]) for i in range(self.job.params.n)
        ]

    def deltas(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            text, entries = d.text, (d.prompt_logprobs or []) + (d.logprobs or [])
            if self.job.echo and d.index not in self._echoed:
                self._echoed.add(d.index)
                text = (self.job.prompt or "") + text
            if text or entries:
                scores = self._scores(entries, d.index)
                out.append(self._chunk([self._choice(d.index, text, None, scores=scores)]))
            if d.finish_reason:
                out.append(self._chunk([self._choice(d.index, None, d.finish_reason)]))
        return out

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage=usage.model_dump())

    def collected(self, c: Collector) -> dict[str, Any]:
        """The whole answer from a Collector's texts, finish reasons, scores and usage."""
        return self.whole(c.texts, c.finish, c.usage, c.entries)

    def whole(
        self,
        texts: list[str],
        finish: list[str | None],
        usage: Usage | None,
        entries: list[list[TokenLogprob]] | None = None,
    ) -> dict[str, Any]:
        scores = [self._scores(e, i) for i, e in enumerate(entries or [[] for _ in texts])]
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": scores[i],
                    "finish_reason": finish[i],
                }
                for i, t in enumerate(texts)
            ]
        else:
            echo = (self.job.prompt or "") if self.job.echo else ""
            choices = [
                {"index": i, "text": echo + t, "logprobs": scores[i], "finish_reason": finish[i]}
                for i, t in enumerate(texts)
            ]
        return {
            "id": self.job.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.job.created,
            "model": self.job.model,
            "choices": choices,
            "usage": usage.model_dump() if usage else None,
        }


@dataclass
class Collector:
    """Folds chunks into whole texts; a new attempt (re-delivery) starts over."""

    n: int
    attempt: int = 1
    texts: list[str] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    usage: Usage | None = None
    entries: list[list[TokenLogprob]] = field(default_factory=list)  # prompt's, then its own

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.texts = [""] * self.n
        self.finish = [None] * self.n
        self.entries = [[] for _ in range(self.n)]

    def add(self, chunk: Chunk) -> None:
        if chunk.attempt != self.attempt:
            self.attempt = chunk.attempt
            self._reset()
        for d in chunk.choices:
            self.texts[d.index] += d.text
            self.entries[d.index] += (d.prompt_logprobs or []) + (d.logprobs or [])
            self.finish[d.index] = d.finish_reason or self.finish[d.index]
        self.usage = chunk.usage or self.usage
