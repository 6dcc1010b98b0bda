"""A continuous-batching engine: every running sequence decodes in one batch per step.

Jobs join between steps (their prompt is prefilled into free cache slots) and leave when
they finish or are cancelled, freeing their slots for the next step. Each job keeps its
own sampling parameters, seed, stop strings and stop tokens. The ``n`` choices of a job take
``n`` slots that share one prefill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrelay.queueing.messages import ChoiceDelta, Job, SamplingParams, TokenLogprob

from .engine import EngineEvent, InvalidRequest, JobHandle, ThreadedEngine, max_tokens_for
from .hf_engine import eos_ids
from .llama_runner import LlamaRunner
from .logprobs import Namer, Scored, prompt_entries
from .penalties import TokenHistory, check_logit_bias, needs_history
from .priority import HELD_POLL_S, Priority
from .prompts import encode_prompt
from .sampling import make_generator, sample_rows
from .text import TextTracker

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    slot: int
    tracker: TextTracker
    length: int  # tokens in the cache once every launched step has run
    last: int = 0  # the newest token known on the host
    on_device: bool = False  # the next input is the last launched step's output
    finish: str | None = None
    history: int | None = None  # its row of the engine's TokenHistory (penalties.py)


@dataclass
class _Run:
    job: Job
    handle: JobHandle
    prompt_len: int
    max_tokens: int
    generator: torch.Generator
    stop_ids: set[int]
    seqs: list[_Seq] = field(default_factory=list)
    generated: int = 0
    completion_tokens: int = 0
    ended: bool = False
    prompt_scores: list[TokenLogprob] | None = None  # echo: sent with each first delta

    @property
    def done(self) -> bool:
        return all(s.finish is not None for s in self.seqs)


class BatchEngine(ThreadedEngine):
    name = "batch"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        slots: int = 64,
        max_len: int | None = None,
        prefill_budget: int = 4096,
        admit_window: float = 0.015,
        admit_batch: int = 8,
    ) -> None:
        config_len = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        self.max_context = min(max_len or config_len, config_len)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids(model, tokenizer)
        self.namer = Namer(tokenizer)
        self.runner = LlamaRunner(model, slots, self.max_context)
        self.runner.capture_graphs()
        self.device = self.runner.device
        # batch lines wait and pause while interactive jobs run: a step's cost grows with
        # its sequences on a CPU; on a GPU a few more cost about nothing, so they ride along
        self.priority = Priority(strict=self.device.type == "cpu")
        self.prefill_budget = prefill_budget
        self.admit_window = admit_window
        self.admit_batch = admit_batch
        self._waiting_since = 0.0
        self._shared = torch.Generator(device=self.device)
        self._shared.seed()
        self.history = TokenHistory(int(model.config.vocab_size), self.device)
        self._free = list(range(slots))
        self._waiting: list[tuple[Job, JobHandle]] = []
        self._closed = False
        log.info(
            "batch engine: %d slots x %d tokens, KV cache %.2f GiB",
            slots,
            self.max_context,
            self.runner.kv_bytes / 2**30,
        )
        self._start_thread("batch-engine")

    # engine thread

    def _loop(self) -> None:
        """Launch step t+1 on the GPU before turning step t's tokens into text, so the
        host's work (detokenizing, stop strings, events) overlaps the device's."""
        running: list[_Run] = []
        pending: _Step | None = None
        while not self._closed:
            # idle, or holding only batch lines back (priority.py): wait for an arrival
            idle = not running and pending is None
            self._collect(block=idle, timeout=HELD_POLL_S if self._waiting else None)
            running += self._admit(running)
            running = [r for r in running if not self._drop_cancelled(r)]
            running = self._end_finished(running)
            try:
                launched = self._launch(running, pending) if running else None
                if pending is not None:
                    self._finish_step(pending)
            except Exception as exc:  # a failed step fails the jobs in it, not the worker
                log.exception("decode step failed")
                for r in running:
                    self._end(r, exc)
                running, launched = [], None
            pending = launched
            running = self._end_finished(running)
        for r in running:
            self._end(r)

    def _admit(self, running: list[_Run]) -> list[_Run]:
        """Prefill waiting jobs, together in one pass, while slots and the budget last.

        While sequences are decoding, arrivals are gathered for up to ``admit_window``
        seconds (or until ``admit_batch`` wait), so a trickle of requests costs a few
        batched prefills instead of one stall of the decode loop each.
        """
        if running and self._waiting and len(self._waiting) < self.admit_batch:
            if time.monotonic() - self._waiting_since < self.admit_window:
                return []
        admitted: list[tuple[_Run, list[int]]] = []
        budget, free = self.prefill_budget, len(self._free)
        self._waiting.sort(key=lambda item: item[1].background)  # stable: interactive first
        foreground, lines = self._foreground(running), 0
        while self._waiting and budget > 0:
            job, handle = self._waiting[0]
            if handle.background and not self.priority.admits_background(foreground, lines):
                break  # its prefill would hold up interactive jobs (priority.py)
            lines += handle.background
            if job.params.n > self.runner.slots:
                self._waiting.pop(0)
                self._reject(
                    handle,
                    InvalidRequest(
                        f"n={job.params.n} is more than this worker's {self.runner.slots} "
                        "sequence slots",
                        code="n_too_large",
                    ),
                )
                continue
            if job.params.n > free:
                break
            self._waiting.pop(0)
            try:
                run, ids = self._prepare(job, handle)
            except Exception as exc:
                if not isinstance(exc, InvalidRequest):
                    log.exception("could not prepare %s", job.id)
                self._reject(handle, exc)
                continue
            free -= job.params.n
            budget -= len(ids)
            admitted.append((run, ids))
        if not admitted:
            return []
        try:
            self._prefill(admitted)
        except Exception as exc:
            log.exception("prefill failed")
            for run, _ in admitted:
                self._end(run, exc)
            return []
        return [run for run, _ in admitted]

    def _reject(self, handle: JobHandle, exc: BaseException) -> None:
        handle.put(exc)
        handle.close()

    def _prepare(self, job: Job, handle: JobHandle) -> tuple[_Run, list[int]]:
        ids = encode_prompt(self.tokenizer, job)
        params = job.params
        check_logit_bias(params, self.history.vocab)
        run = _Run(
            job=job,
            handle=handle,
            prompt_len=len(ids),
            max_tokens=max_tokens_for(job, len(ids), self.max_context),
            generator=make_generator(params, self.device),
            stop_ids=set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids),
        )
        # interactive jobs take the lowest free slots and batch lines the highest: a step
        # is as wide as its highest slot, so one of interactive sequences alone stays narrow
        slots = [self._free.pop(-1 if handle.background else 0) for _ in range(params.n)]
        run.seqs = [_Seq(slot, self._tracker(params), len(ids)) for slot in slots]
        if needs_history(params):
            for seq in run.seqs:
                seq.history = self.history.acquire(ids)
        return run, ids

    def _tracker(self, params: SamplingParams) -> TextTracker:
        return TextTracker(
            self._decode, params.stop, params.include_stop_str_in_output, params.min_tokens
        )

    def _prefill(self, admitted: list[tuple[_Run, list[int]]]) -> None:
        """One forward pass for every admitted prompt, one sampling pass for their first
        tokens, one wait for the device."""
        scored = [row for row, (r, _) in enumerate(admitted) if _prompt_k(r) is not None]
        logits, full = self.runner.prefill_scored(
            [r.seqs[0].slot for r, _ in admitted], [ids for _, ids in admitted], scored
        )
        for row in scored:
            run, ids = admitted[row]
            run.prompt_scores = prompt_entries(self.namer, full[row], ids, _prompt_k(run) or 0)
        rows: list[int] = []
        params: list[SamplingParams | None] = []
        generators: list[torch.Generator | None] = []
        histories: list[int | None] = []
        stops: list[Collection[int] | None] = []
        for row, (run, ids) in enumerate(admitted):
            for seq in run.seqs[1:]:
                self.runner.copy_slot(run.seqs[0].slot, seq.slot, len(ids))
            seeded = run.generator if run.job.params.seed is not None else None
            for seq in run.seqs:
                rows.append(row)
                params.append(run.job.params)
                generators.append(seeded)
                histories.append(seq.history)
                stops.append(run.stop_ids)
        picked = sample_rows(
            logits[_to(self.device, rows)],
            params,
            generators,
            self._shared,
            self.history,
            histories,
            stops,
        )
        scores = self._score(logits[_to(self.device, rows)], picked, [r for r, _ in admitted])
        firsts = iter(zip(picked.tolist(), scores, strict=True))
        for run, _ in admitted:
            tokens, entries = zip(*[next(firsts) for _ in run.seqs], strict=True)
            if run.max_tokens == 0:  # echo's scoring alone: nothing generated
                event = self._scored_only(run)
            else:
                event = self._advance(run, list(tokens), list(entries))
            if event:
                run.handle.put(event)

    def _score(
        self, logits: torch.Tensor, picked: torch.Tensor, runs: list[_Run]
    ) -> list[TokenLogprob | None]:
        """The raw log probabilities of each row's picked token (rows: the runs' choices
        in order), for the runs that ask; None for the others."""
        ks = [r.job.params.logprobs for r in runs for _ in r.seqs]
        want = [row for row, k in enumerate(ks) if k is not None]
        out: list[TokenLogprob | None] = [None] * len(ks)
        if not want:
            return out
        index = _to(self.device, want)
        scored = Scored(logits[index], picked[index], max(ks[row] or 0 for row in want))
        for row, (token, lp, top) in zip(want, scored.rows(), strict=True):
            out[row] = self.namer.entry(token, lp, top[: ks[row]])
        return out

    def _scored_only(self, run: _Run) -> EngineEvent:
        for seq in run.seqs:
            seq.finish = "length"
        deltas = [
            ChoiceDelta(index=i, finish_reason="length", prompt_logprobs=run.prompt_scores)
            for i in range(len(run.seqs))
        ]
        return EngineEvent(deltas, run.prompt_len, 0)

    def _end_finished(self, running: list[_Run]) -> list[_Run]:
        for run in running:
            if run.done:
                self._end(run)
        return [r for r in running if not r.done]

    def _drop_cancelled(self, run: _Run) -> bool:
        cancelled = self.forget_cancel(run.job.id)
        if cancelled:
            self._end(run)
        return cancelled

    def _foreground(self, running: list[_Run]) -> bool:
        """Whether an interactive job runs or waits."""
        return any(not r.handle.background for r in running) or any(
            not handle.background for _, handle in self._waiting
        )

    def _launch(self, running: list[_Run], previous: _Step | None) -> _Step | None:
        """Queue one decode step for every live sequence; returns without waiting. On a CPU,
        where a step's cost grows with its sequences, batch lines sit out the steps that
        interactive sequences take (priority.py)."""
        live = [(r, s) for r in running for s in r.seqs if s.finish is None]
        if self.priority.pauses_background(any(not r.handle.background for r, _ in live)):
            for run, s in live:
                if run.handle.background:
                    s.on_device = False  # resumed from its host token, read by then
            live = [(r, s) for r, s in live if not r.handle.background]
        if not live:
            return None
        width = max(s.slot for _, s in live) + 1
        tokens, positions = [0] * width, [self.runner.scratch] * width
        from_device = [False] * width
        params: list[SamplingParams | None] = [None] * width
        generators: list[torch.Generator | None] = [None] * width
        histories: list[int | None] = [None] * width
        stops: list[Collection[int] | None] = [None] * width
        for run, s in live:
            tokens[s.slot], positions[s.slot] = s.last, s.length
            from_device[s.slot] = s.on_device
            params[s.slot] = run.job.params
            generators[s.slot] = run.generator if run.job.params.seed is not None else None
            histories[s.slot], stops[s.slot] = s.history, run.stop_ids
        token_ids = _to(self.device, tokens)
        if previous is not None and any(from_device):
            earlier = torch.zeros(width, dtype=torch.long, device=self.device)
            n = min(width, previous.picked.shape[0])
            earlier[:n] = previous.picked[:n]
            token_ids = torch.where(_to(self.device, from_device, torch.bool), earlier, token_ids)
        logits = self.runner.decode(token_ids, _to(self.device, positions))
        picked = sample_rows(
            logits, params, generators, self._shared, self.history, histories, stops
        )
        for _, s in live:
            s.length += 1
            s.on_device = True
        return _Step(live, picked, _launch_scores(logits, picked, live))

    def _finish_step(self, step: _Step) -> None:
        """Wait for a launched step's tokens; emit text and finish reasons."""
        picked = step.tokens()
        scores = step.scores(self.namer)
        by_run: dict[int, tuple[_Run, list[int]]] = {}
        for run, s in step.live:
            if run.ended or s.finish is not None:
                continue
            by_run.setdefault(id(run), (run, []))
        events = []
        for run, _ in by_run.values():
            tokens = [picked[s.slot] if s.finish is None else 0 for s in run.seqs]
            entries = [scores.get(s.slot) for s in run.seqs]
            event = self._advance(run, tokens, entries)
            if event:
                events.append((run.handle, event))
        if events:
            JobHandle.put_all(events[0][0].loop, events)

    def _advance(
        self, run: _Run, tokens: list[int], entries: list[TokenLogprob | None]
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
                elif run.generated >= run.max_tokens or seq.length + 1 >= self.max_context:
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

    def _end(self, run: _Run, error: BaseException | None = None) -> None:
        if run.ended:
            return
        run.ended = True
        for seq in run.seqs:
            self._free.append(seq.slot)
            if seq.history is not None:
                self.history.release(seq.history)
        self._free.sort()
        if error is not None:
            run.handle.put(error)
        run.handle.close()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _prompt_k(run: _Run) -> int | None:
    return run.job.params.prompt_logprobs


def _launch_scores(
    logits: torch.Tensor, picked: torch.Tensor, live: list[tuple[_Run, _Seq]]
) -> tuple[Scored, list[int], list[int]] | None:
    """Launched with the step: the log probabilities of the slots whose jobs ask, their
    slots and each one's top count."""
    want = [(s.slot, r.job.params.logprobs) for r, s in live if r.job.params.logprobs is not None]
    if not want:
        return None
    slots, ks = [w[0] for w in want], [w[1] or 0 for w in want]
    index = _to(logits.device, slots)
    return Scored(logits[index], picked[index], max(ks)), slots, ks


class _Step:
    """A launched decode step: its sampled tokens are copied to the host asynchronously."""

    def __init__(
        self,
        live: list[tuple[_Run, _Seq]],
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


def _to(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:  # type: ignore[type-arg]
    """A small host list on the device without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
