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

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrelay.queueing.messages import ChoiceDelta, Job, SamplingParams, TokenLogprob

from .batch_state import Run, Seq, Step, advance, launch_scores, prompt_k, to_device
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
        running: list[Run] = []
        pending: Step | None = None
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

    def _admit(self, running: list[Run]) -> list[Run]:
        """Prefill waiting jobs, together in one pass, while slots and the budget last.

        While sequences are decoding, arrivals are gathered for up to ``admit_window``
        seconds (or until ``admit_batch`` wait), so a trickle of requests costs a few
        batched prefills instead of one stall of the decode loop each.
        """
        if running and self._waiting and len(self._waiting) < self.admit_batch:
            if time.monotonic() - self._waiting_since < self.admit_window:
                return []
        admitted: list[tuple[Run, list[int]]] = []
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

    def _prepare(self, job: Job, handle: JobHandle) -> tuple[Run, list[int]]:
        ids = encode_prompt(self.tokenizer, job)
        params = job.params
        check_logit_bias(params, self.history.vocab)
        run = Run(
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
        run.seqs = [Seq(slot, self._tracker(params), len(ids)) for slot in slots]
        if needs_history(params):
            for seq in run.seqs:
                seq.history = self.history.acquire(ids)
        return run, ids

    def _tracker(self, params: SamplingParams) -> TextTracker:
        return TextTracker(
            self._decode, params.stop, params.include_stop_str_in_output, params.min_tokens
        )

    def _prefill(self, admitted: list[tuple[Run, list[int]]]) -> None:
        """One forward pass for every admitted prompt, one sampling pass for their first
        tokens, one wait for the device."""
        scored = [row for row, (r, _) in enumerate(admitted) if prompt_k(r) is not None]
        logits, full = self.runner.prefill_scored(
            [r.seqs[0].slot for r, _ in admitted], [ids for _, ids in admitted], scored
        )
        for row in scored:
            run, ids = admitted[row]
            run.prompt_scores = prompt_entries(self.namer, full[row], ids, prompt_k(run) or 0)
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
            logits[to_device(self.device, rows)],
            params,
            generators,
            self._shared,
            self.history,
            histories,
            stops,
        )
        scores = self._score(logits[to_device(self.device, rows)], picked, [r for r, _ in admitted])
        firsts = iter(zip(picked.tolist(), scores, strict=True))
        for run, _ in admitted:
            tokens, entries = zip(*[next(firsts) for _ in run.seqs], strict=True)
            if run.max_tokens == 0:  # echo's scoring alone: nothing generated
                event = self._scored_only(run)
            else:
                event = advance(run, list(tokens), list(entries), self.max_context)
            if event:
                run.handle.put(event)

    def _score(
        self, logits: torch.Tensor, picked: torch.Tensor, runs: list[Run]
    ) -> list[TokenLogprob | None]:
        """The raw log probabilities of each row's picked token (rows: the runs' choices
        in order), for the runs that ask; None for the others."""
        ks = [r.job.params.logprobs for r in runs for _ in r.seqs]
        want = [row for row, k in enumerate(ks) if k is not None]
        out: list[TokenLogprob | None] = [None] * len(ks)
        if not want:
            return out
        index = to_device(self.device, want)
        scored = Scored(logits[index], picked[index], max(ks[row] or 0 for row in want))
        for row, (token, lp, top) in zip(want, scored.rows(), strict=True):
            out[row] = self.namer.entry(token, lp, top[: ks[row]])
        return out

    def _scored_only(self, run: Run) -> EngineEvent:
        for seq in run.seqs:
            seq.finish = "length"
        deltas = [
            ChoiceDelta(index=i, finish_reason="length", prompt_logprobs=run.prompt_scores)
            for i in range(len(run.seqs))
        ]
        return EngineEvent(deltas, run.prompt_len, 0)

    def _end_finished(self, running: list[Run]) -> list[Run]:
        for run in running:
            if run.done:
                self._end(run)
        return [r for r in running if not r.done]

    def _drop_cancelled(self, run: Run) -> bool:
        cancelled = self.forget_cancel(run.job.id)
        if cancelled:
            self._end(run)
        return cancelled

    def _foreground(self, running: list[Run]) -> bool:
        """Whether an interactive job runs or waits."""
        return any(not r.handle.background for r in running) or any(
            not handle.background for _, handle in self._waiting
        )

    def _launch(self, running: list[Run], previous: Step | None) -> Step | None:
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
        token_ids = to_device(self.device, tokens)
        if previous is not None and any(from_device):
            earlier = torch.zeros(width, dtype=torch.long, device=self.device)
            n = min(width, previous.picked.shape[0])
            earlier[:n] = previous.picked[:n]
            token_ids = torch.where(
                to_device(self.device, from_device, torch.bool), earlier, token_ids
            )
        logits = self.runner.decode(token_ids, to_device(self.device, positions))
        picked = sample_rows(
            logits, params, generators, self._shared, self.history, histories, stops
        )
        for _, s in live:
            s.length += 1
            s.on_device = True
        return Step(live, picked, launch_scores(logits, picked, live))

    def _finish_step(self, step: Step) -> None:
        """Wait for a launched step's tokens; emit text and finish reasons."""
        picked = step.tokens()
        scores = step.scores(self.namer)
        by_run: dict[int, tuple[Run, list[int]]] = {}
        for run, s in step.live:
            if run.ended or s.finish is not None:
                continue
            by_run.setdefault(id(run), (run, []))
        events = []
        for run, _ in by_run.values():
            tokens = [picked[s.slot] if s.finish is None else 0 for s in run.seqs]
            entries = [scores.get(s.slot) for s in run.seqs]
            event = advance(run, tokens, entries, self.max_context)
            if event:
                events.append((run.handle, event))
        if events:
            JobHandle.put_all(events[0][0].loop, events)

    def _end(self, run: Run, error: BaseException | None = None) -> None:
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
