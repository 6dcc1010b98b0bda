"""FastChat's way, kept as a baseline: one request at a time through ``model.generate()``.

FastChat's HF worker streams one request at a time with plain ``generate()``; the
benchmark runs this engine beside the paged engine to measure what batching buys.
"""

from __future__ import annotations

import logging

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tokenrelay.queueing.messages import ChoiceDelta, Job, SamplingParams

from .engine import EngineEvent, InvalidRequest, JobHandle, ThreadedEngine
from .hf_engine import eos_ids
from .logprobs import refuse_logprobs
from .penalties import LogitAdjuster, TokenHistory, check_logit_bias, needs_history
from .prompts import encode_prompt
from .text import TextTracker

log = logging.getLogger(__name__)


class _Streamer:
    """Receives generate()'s tokens one by one and forwards them as events."""

    def __init__(
        self,
        engine: GenerateEngine,
        job: Job,
        handle: JobHandle,
        prompt_len: int,
        stop_ids: set[int],
    ) -> None:
        self.engine, self.job, self.handle = engine, job, handle
        self.prompt_len = prompt_len
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        p = job.params
        self.tracker = TextTracker(
            engine._decode, p.stop, p.include_stop_str_in_output, p.min_tokens
        )
        self.started = False

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # generate() first echoes the prompt
            self.started = True
            return
        if self.engine.is_cancelled(self.job.id):
            raise _Cancelled
        new = value.view(-1).tolist()
        self.ids.extend(new)
        self.send(self.tracker.add_many([t for t in new if t not in self.stop_ids]))
        if self.tracker.stopped:  # a stop string: generate() ends here
            raise _Stopped

    def send(self, text: str, finish: str | None = None) -> None:
        if text or finish:
            deltas = [ChoiceDelta(index=0, text=text, finish_reason=finish)]
            self.handle.put(EngineEvent(deltas, self.prompt_len, len(self.ids)))

    def end(self) -> None:
        pass


class _Cancelled(Exception):
    pass


class _Stopped(Exception):
    pass


class _Extras(LogitsProcessor):
    """The request's logit_bias, min_tokens and penalties (penalties.py) inside generate():
    each call first counts the token the last one led to."""

    def __init__(self, adjust: LogitAdjuster, prompt_len: int) -> None:
        self.adjust, self.prompt_len = adjust, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] > self.prompt_len:
            self.adjust.record(input_ids[:, -1])
        return self.adjust(scores)  # type: ignore[return-value]


class GenerateEngine(ThreadedEngine):
    name = "generate"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = eos_ids(model, tokenizer)
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
        check_logit_bias(params, int(self.model.config.vocab_size))
        refuse_logprobs(job, self.name)  # not scored here (logprobs.py)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        streamer = _Streamer(self, job, handle, len(ids), stop_ids)
        max_new = params.max_tokens or max(1, self.max_context - len(ids))
        sampling: dict[str, object] = {"do_sample": False}
        if params.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k or None,
                "min_p": params.min_p or None,
            }
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stopped = False
        try:
            with torch.inference_mode():
                self.model.generate(
                    torch.tensor([ids], device=self.device),
                    max_new_tokens=max_new,
                    # no stop ids: generate() falls back to the model's EOS, held back here
                    min_new_tokens=max_new if params.ignore_eos and not stop_ids else None,
                    eos_token_id=sorted(stop_ids) or None,
                    streamer=streamer,
                    pad_token_id=self.tokenizer.eos_token_id,
                    logits_processor=self._extras(params, ids, stop_ids),
                    **sampling,
                )
        except _Stopped:
            stopped = True
        text = "" if stopped else streamer.tracker.flush()
        length = not stopped and len(streamer.ids) >= max_new and streamer.ids[-1] not in stop_ids
        streamer.send(text, "length" if length else "stop")

    def _extras(
        self, params: SamplingParams, ids: list[int], stop_ids: set[int]
    ) -> LogitsProcessorList:
        if not (params.logit_bias or needs_history(params)):
            return LogitsProcessorList()
        history = TokenHistory(int(self.model.config.vocab_size), self.device, rows=1)
        rows: list[int | None] = [history.acquire(ids)]
        adjust = LogitAdjuster.build([params], self.device, history, rows, [stop_ids])
        assert adjust is not None
        return LogitsProcessorList([_Extras(adjust, len(ids))])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
