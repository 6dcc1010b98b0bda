"""FastChat's way, kept as a baseline: one request at a time through ``model.generate()``.

FastChat's HF worker streams one request at a time with plain ``generate()``; the
benchmark runs this engine beside the paged engine to measure what batching buys.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrelay.queueing.messages import ChoiceDelta, Job

from .engine import EngineEvent, InvalidRequest, JobHandle, ThreadedEngine
from .prompts import encode_prompt

log = logging.getLogger(__name__)


class _Streamer:
    """Receives generate()'s tokens one by one and forwards them as events."""

    def __init__(self, engine: GenerateEngine, job: Job, handle: JobHandle, prompt_len: int):
        self.engine, self.job, self.handle = engine, job, handle
        self.prompt_len = prompt_len
        self.ids: list[int] = []
        self.sent = ""
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # generate() first echoes the prompt
            self.started = True
            return
        if self.engine.is_cancelled(self.job.id):
            raise _Cancelled
        self.ids.extend(value.view(-1).tolist())
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        delta, self.sent = text[len(self.sent) :], text
        if delta:
            deltas = [ChoiceDelta(index=0, text=delta)]
            self.handle.put(EngineEvent(deltas, self.prompt_len, len(self.ids)))

    def end(self) -> None:
        pass


class _Cancelled(Exception):
    pass


class GenerateEngine(ThreadedEngine):
    name = "generate"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self._start_thread("generate-engine")

    def _loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            job, handle = item
            try:
                self._run(job, handle)
            except _Cancelled:
                pass
            except Exception as exc:
                if not isinstance(exc, InvalidRequest):
                    log.exception("generate() failed for %s", job.id)
                handle.put(exc)
            finally:
                handle.close()

    def _run(self, job: Job, handle: JobHandle) -> None:
        if job.params.n != 1:
            raise InvalidRequest("the generate baseline engine serves n=1 only")
        ids = encode_prompt(self.tokenizer, job)
        params = job.params
        streamer = _Streamer(self, job, handle, len(ids))
        max_new = params.max_tokens or max(1, self.max_context - len(ids))
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k or None,
            }
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids], device=self.device),
                max_new_tokens=max_new,
                min_new_tokens=max_new if params.ignore_eos else None,
                streamer=streamer,
                pad_token_id=self.tokenizer.eos_token_id,
                **sampling,
            )
        final = ChoiceDelta(
            index=0, finish_reason="length" if len(streamer.ids) >= max_new else "stop"
        )
        handle.put(EngineEvent([final], len(ids), len(streamer.ids)))
