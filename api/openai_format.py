"""Queue chunks rendered as OpenAI objects: chat and text completions, streamed or whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenrelay.queueing.messages import ChoiceDelta, Chunk, Job, Usage


@dataclass
class Formatter:
    job: Job
    include_usage: bool = False

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
        self, index: int, text: str | None, finish: str | None, role: bool = False
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

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
            if d.text:
                out.append(self._chunk([self._choice(d.index, d.text, None)]))
            if d.finish_reason:
                out.append(self._chunk([self._choice(d.index, None, d.finish_reason)]))
        return out

    def usage(self, usage: Usage) -> dict[str, Any]:
        return self._chunk([], usage=usage.model_dump())

    def whole(self, texts: list[str], finish: list[str | None], usage: Usage | None) -> dict:
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "logprobs": None,
                    "finish_reason": finish[i],
                }
                for i, t in enumerate(texts)
            ]
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": finish[i]}
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

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.texts = [""] * self.n
        self.finish = [None] * self.n

    def add(self, chunk: Chunk) -> None:
        if chunk.attempt != self.attempt:
            self.attempt = chunk.attempt
            self._reset()
        for d in chunk.choices:
            self.texts[d.index] += d.text
            self.finish[d.index] = d.finish_reason or self.finish[d.index]
        self.usage = chunk.usage or self.usage
