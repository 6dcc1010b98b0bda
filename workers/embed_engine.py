"""The engine of an embedding model: many inputs per forward pass, across requests.

Its thread takes every job waiting, tokenizes and checks each whole (a job with one input
too long is refused before any of it runs), then runs all their inputs together, sorted
by length so that rows of one forward pass pad little, in passes of at most ``max_batch``
inputs and ``max_batch_tokens`` padded tokens. After each pass every job with inputs in it
gets an event: one ``ChoiceDelta`` per input done, its vector as base64 of little-endian
float32 (the bytes OpenAI sends), made here, off the event loop.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenrelay.queueing.messages import ChoiceDelta, Job

from .engine import EngineEvent, InvalidRequest, JobHandle, ThreadedEngine
from .pooling import Pooling, finish, pool

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    job: Job
    handle: JobHandle
    ids: list[list[int]]
    tokens: int  # prompt tokens of all its inputs (usage)
    left: int = 0  # inputs not embedded yet

    def __post_init__(self) -> None:
        self.left = len(self.ids)


@dataclass
class _Pass:
    rows: list[tuple[_Pending, int]] = field(default_factory=list)  # (job, input index)


class EmbedEngine(ThreadedEngine):
    name = "embed"
    task = "embed"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pooling: Pooling,
        *,
        max_length: int,
        matryoshka: bool = False,
        max_batch: int = 64,
        max_batch_tokens: int = 16384,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_context = max_length
        self.dimensions = int(model.config.hidden_size)
        self.matryoshka = matryoshka
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.device = next(model.parameters()).device
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.vocab = int(model.config.vocab_size)
        self._waiting: list[tuple[Job, JobHandle]] = []
        self._start_thread("embed-engine")

    # checking a job

    def _prepare(self, job: Job, handle: JobHandle) -> _Pending | None:
        """The job's token ids, or None after telling it why it cannot run."""
        try:
            if job.kind != "embed" or not job.input:
                raise InvalidRequest(
                    f"'{job.model}' is an embedding model: it serves POST /v1/embeddings only.",
                    code="model_task_mismatch",
                    param="model",
                )
            self._check_dimensions(job.dimensions)
            ids = self._token_ids(job.input or [])
        except InvalidRequest as exc:
            handle.put(exc)
            handle.close()
            return None
        return _Pending(job, handle, ids, sum(len(i) for i in ids))

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or dimensions == self.dimensions and not self.matryoshka:
            return
        if not self.matryoshka:
            raise InvalidRequest(
                f"This model does not support 'dimensions': its vectors have "
                f"{self.dimensions} dimensions, and it was not trained to be cut shorter "
                "(Matryoshka). Leave 'dimensions' out.",
                code="unsupported_value",
                param="dimensions",
            )
        if dimensions > self.dimensions:
            raise InvalidRequest(
                f"dimensions={dimensions} is more than this model's {self.dimensions}.",
                code="invalid_value",
                param="dimensions",
            )

    def _token_ids(self, inputs: list[str | list[int]]) -> list[list[int]]:
        texts = [(i, t) for i, t in enumerate(inputs) if isinstance(t, str)]
        ids: list[list[int]] = [t if isinstance(t, list) else [] for t in inputs]
        if texts:
            encoded = self.tokenizer([t for _, t in texts], add_special_tokens=True)["input_ids"]
            for (i, _), row in zip(texts, encoded, strict=True):
                ids[i] = list(row)
        for i, row in enumerate(ids):
            if len(row) > self.max_context:
                raise InvalidRequest(
                    f"This model's maximum context length is {self.max_context} tokens, "
                    f"however you requested {len(row)} tokens ({len(row)} in input {i}). "
                    "Please reduce the length of the input.",
                    code="context_length_exceeded",
                    param="input",
                )
            bad = [t for t in row if not 0 <= t < self.vocab]
            if bad:
                raise InvalidRequest(
                    f"input {i} has token id {bad[0]}, outside this model's vocabulary "
                    f"(0 to {self.vocab - 1}).",
                    code="invalid_value",
                    param="input",
                )
        return ids

    # the engine thread

    def _loop(self) -> None:
        while True:
            self._collect(block=True)
            taken, self._waiting = self._waiting, []
            jobs = [p for p in (self._prepare(j, h) for j, h in taken) if p is not None]
            try:
                self._run(jobs)
            except Exception as exc:  # the worker retries or dead-letters each job
                log.exception("embedding pass failed")
                for pending in jobs:
                    if pending.left:
                        pending.handle.put(exc)
                        pending.handle.close()
            if self._closed:
                return

    def _run(self, jobs: list[_Pending]) -> None:
        for batch in self._passes(jobs):
            live = [(p, i) for p, i in batch.rows if not self._dropped(p)]
            if not live:
                continue
            vectors = self._forward([p.ids[i] for p, i in live])
            events: dict[str, tuple[_Pending, list[ChoiceDelta]]] = {}
            for (p, i), vector in zip(live, vectors, strict=True):
                vector = finish(vector[None], self.pooling.normalize, p.job.dimensions)[0]
                delta = ChoiceDelta(index=i, embedding=_b64(vector))
                events.setdefault(p.job.id, (p, []))[1].append(delta)
            for p, deltas in events.values():
                p.left -= len(deltas)
                p.handle.put(EngineEvent(deltas, p.tokens, 0))
                if not p.left:
                    p.handle.close()
                    self.forget_cancel(p.job.id)

    def _dropped(self, pending: _Pending) -> bool:
        """A cancelled job: its stream ends with what it had."""
        if pending.left and self.forget_cancel(pending.job.id):
            pending.left = 0
            pending.handle.close()
        return not pending.left

    def _passes(self, jobs: list[_Pending]) -> list[_Pass]:
        rows = sorted(
            ((p, i) for p in jobs for i in range(len(p.ids))), key=lambda r: len(r[0].ids[r[1]])
        )
        passes: list[_Pass] = []
        current = _Pass()
        for p, i in rows:  # ascending length: a row's length is the pass's padded width
            width = len(p.ids[i])
            full = len(current.rows) >= self.max_batch
            if current.rows and (full or width * (len(current.rows) + 1) > self.max_batch_tokens):
                passes.append(current)
                current = _Pass()
            current.rows.append((p, i))
        if current.rows:
            passes.append(current)
        return passes

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):  # right-padded: "last" pooling reads mask.sum() - 1
            ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[n, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return pool(hidden, mask, self.pooling.mode)


def _b64(vector: torch.Tensor) -> str:
    """OpenAI's base64 embedding: the raw little-endian float32 array."""
    array = vector.float().cpu().numpy().astype("<f4")
    return base64.b64encode(array.tobytes()).decode("ascii")
