"""A transformers engine: one thread steps every running job, a token at a time.

Jobs join and leave between steps, each with its own KV cache, sampling parameters and
stop rules; a cancelled job stops at the next step. The ``n`` choices of one job run as
one batch.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tokenrelay.queueing.messages import ChoiceDelta, Job, SamplingParams, TokenLogprob

from .engine import EngineEvent, InvalidRequest, JobHandle, ThreadedEngine, max_tokens_for
from .logprobs import Namer, Scored, prompt_entries
from .penalties import LogitAdjuster, TokenHistory, check_logit_bias, needs_history
from .prompts import encode_prompt
from .sampling import make_generator, sample
from .text import TextTracker

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job: Job
    handle: JobHandle
    prompt_len: int
    max_tokens: int
    generator: torch.Generator
    trackers: list[TextTracker]
    finish: list[str | None]
    cache: DynamicCache = field(default_factory=DynamicCache)
    next_ids: torch.Tensor | None = None
    adjust: LogitAdjuster | None = None  # the request's penalties, bias and min_tokens
    generated: int = 0  # steps taken; each running choice gets one token a step
    completion_tokens: int = 0
    scored: Scored | None = None  # next_ids' log probabilities, where asked (logprobs.py)
    prompt_scores: list[TokenLogprob] | None = None  # echo: sent with each first delta


class HFEngine(ThreadedEngine):
    name = "transformers"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.namer = Namer(tokenizer)
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = eos_ids(model, tokenizer)
        self._start_thread("hf-engine")

    # engine thread

    def _loop(self) -> None:
        running: list[_Running] = []
        while True:
            try:
                new = self._take_new(block=not running)
            except _Closed:
                for r in running:
                    r.handle.close()
                return
            for job, handle in new:
                started = self._start(job, handle)
                if started:
                    running.append(started)
            for r in list(running):
                if self._step(r):
                    running.remove(r)
                    self.forget_cancel(r.job.id)

    def _take_new(self, block: bool) -> list[tuple[Job, JobHandle]]:
        items = []
        try:
            items.append(self._inbox.get(block=block, timeout=None))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if None in items:
            raise _Closed
        return [i for i in items if i is not None]

    def _start(self, job: Job, handle: JobHandle) -> _Running | None:
        try:
            ids = encode_prompt(self.tokenizer, job)
            max_tokens = max_tokens_for(job, len(ids), self.max_context)
            generator = make_generator(job.params, self.device)
            params = job.params
            n = params.n
            check_logit_bias(params, int(self.model.config.vocab_size))
            r = _Running(
                job=job,
                handle=handle,
                prompt_len=len(ids),
                max_tokens=max_tokens,
                generator=generator,
                trackers=[
                    TextTracker(
                        self._decode,
                        params.stop,
                        params.include_stop_str_in_output,
                        params.min_tokens,
                    )
                    for _ in range(n)
                ],
                finish=[None] * n,
                adjust=self._adjuster(params, ids),
            )
            input_ids = torch.tensor([ids] * n, device=self.device)
            self._forward(r, input_ids)
            if max_tokens == 0:  # echo's scoring alone: nothing generated
                deltas = [
                    ChoiceDelta(index=i, finish_reason="length", prompt_logprobs=r.prompt_scores)
                    for i in range(n)
                ]
                handle.put(EngineEvent(deltas, r.prompt_len, 0))
                handle.close()
                return None
            return r
        except InvalidRequest as exc:
            handle.put(exc)
        except Exception as exc:
            log.exception("prefill failed for %s", job.id)
            handle.put(exc)
        handle.close()
        return None

    def _adjuster(self, params: SamplingParams, ids: list[int]) -> LogitAdjuster | None:
        if not (params.logit_bias or needs_history(params)):
            return None
        n = params.n
        history = TokenHistory(int(self.model.config.vocab_size), self.device, rows=n)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        rows: list[int | None] = [history.acquire(ids) for _ in range(n)]
        return LogitAdjuster.build([params] * n, self.device, history, rows, [stop_ids] * n)

    @torch.inference_mode()
    def _forward(self, r: _Running, input_ids: torch.Tensor) -> None:
        out = self.model(input_ids=input_ids, past_key_values=r.cache, use_cache=True)
        logits = out.logits[:, -1, :]
        params = r.job.params
        if params.prompt_logprobs is not None and r.generated == 0:
            ids = input_ids[0].tolist()
            r.prompt_scores = prompt_entries(
                self.namer, out.logits[0].float(), ids, params.prompt_logprobs
            )
        if r.adjust is None:
            r.next_ids = sample(logits, params, r.generator)
        else:
            r.next_ids = sample(r.adjust(logits), params, r.generator)
            r.adjust.record(r.next_ids)
        if params.logprobs is not None:
            r.scored = Scored(logits, r.next_ids, params.logprobs)

    def _step(self, r: _Running) -> bool:
        """Take the sampled token of every live choice, emit text, decode the next step.
        Returns True when the job is over."""
        if self.is_cancelled(r.job.id):
            r.handle.close()
            return True
        try:
            deltas = self._advance(r)
            if deltas:
                r.handle.put(EngineEvent(deltas, r.prompt_len, r.completion_tokens))
            if all(f is not None for f in r.finish):
                r.handle.close()
                return True
            assert r.next_ids is not None
            self._forward(r, r.next_ids.view(-1, 1))
            return False
        except Exception as exc:
            log.exception("decode failed for %s", r.job.id)
            r.handle.put(exc)
            r.handle.close()
            return True

    def _advance(self, r: _Running) -> list[ChoiceDelta]:
        assert r.next_ids is not None
        tokens = r.next_ids.tolist()
        rows = r.scored.rows() if r.scored is not None else None
        first = r.generated == 0 and r.prompt_scores is not None
        r.generated += 1
        params = r.job.params
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        deltas = []
        for i, (token, tracker) in enumerate(zip(tokens, r.trackers, strict=True)):
            if r.finish[i] is not None:
                continue
            r.completion_tokens += 1
            if token in stop_ids:
                text, r.finish[i] = tracker.flush(), "stop"
            else:
                text = tracker.add(token)
                if tracker.stopped:
                    r.finish[i] = "stop"
                elif r.generated >= r.max_tokens:
                    text, r.finish[i] = text + tracker.flush(), "length"
            entry = None if rows is None else self.namer.entry(*rows[i])
            if text or r.finish[i] or entry is not None or first:
                delta = ChoiceDelta(index=i, text=text, finish_reason=r.finish[i])
                delta.logprobs = None if entry is None else [entry]
                delta.prompt_logprobs = r.prompt_scores if first else None
                deltas.append(delta)
        return deltas

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _Closed(Exception):
    pass


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return ids
