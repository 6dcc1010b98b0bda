"""The paged continuous-batching engine: the loop that ties scheduler, runner and sampler.

Each turn of the loop: take new jobs; admit what the cache has blocks for (their prompts
prefilled together, long ones in chunks); give every decoding sequence the block its next
token needs, preempting the newest sequences when none is left; launch the decode step;
and only then turn the previous step's tokens into text, so the host's work overlaps the
device's.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenrelay.queueing.messages import Job, SamplingParams

from ..engine import InvalidRequest, JobHandle, ThreadedEngine, max_tokens_for
from ..hf_engine import eos_ids
from ..logprobs import Namer, prompt_entries
from ..penalties import TokenHistory, check_logit_bias, needs_history
from ..priority import HELD_POLL_S, Priority
from ..prompts import encode_prompt
from ..sampling import BatchSampler, make_generator, sample_rows
from ..text import TextTracker
from .blocks import BlockManager, BlockTable, OutOfBlocks
from .cache import BLOCK_SIZE, CacheShape, KVCache
from .clock import LoopClock
from .graphs import PREFILL_SEQS
from .output import advance, fast_decoder, scored_only
from .runner import ModelRunner, SeqInput, to_device
from .scoring import StepScores
from .sequences import Run, Seq, Step

log = logging.getLogger(__name__)


class PagedEngine(ThreadedEngine):
    name = "paged"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        num_blocks: int,
        max_seqs: int,
        max_len: int,
        prefill_budget: int = 4096,
        admit_window: float = 0.015,
        admit_batch: int = 8,
        eager: bool = False,
        steps_per_launch: int | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.tokenizer = tokenizer
        self._decode = fast_decoder(tokenizer) or self._decode  # type: ignore[method-assign]
        self.eos_ids = eos_ids(model, tokenizer)
        self.namer = Namer(tokenizer)
        self.max_context = max_len
        self.max_seqs = max_seqs
        device = next(model.parameters()).device
        self.cache = KVCache(CacheShape.of(model), num_blocks, device, block_size)
        self.blocks = BlockManager(num_blocks, self.cache.block_size)
        self.runner = self._make_runner(model, max_len, eager, prefill_budget)
        self.runner.capture_graphs(max_seqs)
        self.device = device
        # Batch API lines (JobHandle.background) are admitted after interactive jobs; on a
        # CPU, where a step's cost grows with its sequences, they also wait and sit out the
        # steps while an interactive job runs (on a GPU a few more cost about nothing)
        self.priority = Priority(strict=device.type == "cpu")
        # Decode steps launched back to back before the host looks at their tokens: at
        # hundreds of sequences the host's work per step (inputs, text, events) is longer
        # than the GPU's, and this divides the part that is per launch. A sequence that
        # stops within the run wastes at most steps - 1 positions.
        self.steps_per_launch = steps_per_launch or (4 if device.type == "cuda" else 1)
        self.prefill_budget = prefill_budget
        self.admit_window = admit_window
        self.admit_batch = admit_batch
        self.preemptions = 0
        self._prefilled: list[Step] = []
        self.clock = LoopClock()
        self._waiting_since = 0.0
        self._shared = torch.Generator(device=device)
        self._shared.seed()
        self.history = TokenHistory(int(model.config.vocab_size), device)
        self._waiting: list[tuple[Job, JobHandle] | Run] = []
        self._closed = False
        log.info(
            "paged engine: KV cache of %d tokens (%d blocks of %d, %.2f GiB), up to %d "
            "sequences at once, max length %d",
            self.cache.tokens,
            num_blocks,
            self.cache.block_size,
            self.cache.bytes / 2**30,
            max_seqs,
            max_len,
        )
        self._start_thread("paged-engine")

    def _make_runner(
        self, model: PreTrainedModel, max_len: int, eager: bool, prefill_budget: int
    ) -> ModelRunner:
        """The runner over ``self.cache`` (tensor_parallel: one that leads the other ranks)."""
        return ModelRunner(model, self.cache, max_len, eager=eager, prefill_budget=prefill_budget)

    # engine thread

    def _loop(self) -> None:
        running: list[Run] = []
        # launched work whose tokens the host has not read: the last decode launch, and
        # the first tokens of prompts prefilled since (read after the next launch, so
        # admitting never waits behind queued decode steps)
        pending: list[Step] = []
        clock = self.clock
        while not self._closed:
            # idle, or holding only batch lines back (priority.py): wait for an arrival
            idle = not running and not pending
            self._collect(block=idle, timeout=HELD_POLL_S if self._waiting else None)
            clock.start()
            try:
                running += self._admit(running)
                pending += self._prefilled
                self._prefilled = []
                clock.lap("admit")
                running = [r for r in running if not self._drop_cancelled(r)]
                running = self._end_finished(running)
                steps = self._steps(running)
                if running and not self._reserve(running, steps):
                    steps = 1
                if running and not self._reserve(running, steps):
                    # the cache is full: settle what is in flight, then make room
                    for step in pending:
                        self._finish_step(step)
                    pending = []
                    running = self._end_finished(running)
                    running = self._preempt_until_fits(running)
                clock.lap("schedule")
                launched = self._launch(running, pending, steps) if running else None
                clock.lap("launch")
                for step in pending:
                    self._finish_step(step)
                if pending:
                    clock.steps += 1
            except Exception as exc:  # a failed step fails the jobs in it, not the worker
                log.exception("engine step failed")
                for r in running:
                    self._end(r, exc)
                running, launched = [], None
            pending = [launched] if launched is not None else []
            running = self._end_finished(running)
        for item in running + [w for w in self._waiting if isinstance(w, Run)]:
            self._end(item)

    # admission

    def _admit(self, running: list[Run]) -> list[Run]:
        """Prefill waiting jobs (and preempted runs) while sequences, blocks and the
        prefill budget last. While others decode, arrivals gather for ``admit_window``
        seconds (or until ``admit_batch`` wait), so a trickle costs a few batched
        prefills instead of a stall of the decode loop each."""
        if not self._waiting:
            return []
        if running and len(self._waiting) < self.admit_batch and not self._resumable():
            if time.monotonic() - self._waiting_since < self.admit_window:
                return []
        self._waiting.sort(key=_background)  # stable: interactive first, preempted first
        foreground = any(not r.handle.background for r in running) or any(
            not _background(item) for item in self._waiting
        )
        lines = 0
        live = sum(len(r.live_seqs) for r in running)
        budget = self.prefill_budget
        # keep a few blocks back so running sequences can grow without preempting at once
        reserve = max(1, self.blocks.num_blocks // 100)
        admitted: list[Run] = []
        while self._waiting and budget > 0:
            item = self._waiting[0]
            if _background(item) and not self.priority.admits_background(foreground, lines):
                break  # its prefill would hold up interactive jobs (priority.py)
            run = item if isinstance(item, Run) else self._prepare_or_reject(*item)
            if run is None:
                self._waiting.pop(0)
                continue
            self._waiting[0] = run
            seqs = run.live_seqs
            need = sum(self.blocks.blocks_for(len(s.tokens) + 1) for s in seqs)
            if run.fresh:
                need = self.blocks.blocks_for(len(seqs[0].tokens) + 1) + len(seqs) - 1
            if live + len(seqs) > self.max_seqs or need + reserve > self.blocks.free_blocks:
                if not running and not admitted and need > self.blocks.num_blocks:
                    self._waiting.pop(0)
                    self._end(run, InvalidRequest("the prompt does not fit in the KV cache"))
                    continue
                break
            self._waiting.pop(0)
            live += len(seqs)
            budget -= sum(len(s.tokens) for s in (seqs[:1] if run.fresh else seqs))
            lines += run.handle.background
            admitted.append(run)
        if not admitted:
            return []
        try:
            self._prefill(admitted)
        except Exception as exc:
            log.exception("prefill failed")
            for run in admitted:
                self._end(run, exc)
            return []
        return admitted

    def _resumable(self) -> bool:
        return isinstance(self._waiting[0], Run)

    def _prepare_or_reject(self, job: Job, handle: JobHandle) -> Run | None:
        if job.params.n > self.max_seqs:
            self._reject(
                handle,
                InvalidRequest(
                    f"n={job.params.n} is more than the {self.max_seqs} sequences this "
                    "worker runs at once",
                    code="n_too_large",
                ),
            )
            return None
        try:
            ids = encode_prompt(self.tokenizer, job)
            params = job.params
            check_logit_bias(params, self.history.vocab)
            run = Run(
                job=job,
                handle=handle,
                prompt_len=len(ids),
                max_tokens=max_tokens_for(job, len(ids), self.max_context),
                generator=make_generator(params, self.device),
                stop_ids=set(params.stop_token_ids)
                | (set() if params.ignore_eos else self.eos_ids),
                seqs=[Seq(BlockTable(), self._tracker(params), list(ids)) for _ in range(params.n)],
            )
            if needs_history(params):
                for seq in run.seqs:
                    seq.history = self.history.acquire(ids)
            return run
        except Exception as exc:
            if not isinstance(exc, InvalidRequest):
                log.exception("could not prepare %s", job.id)
            self._reject(handle, exc)
            return None

    def _tracker(self, params: SamplingParams) -> TextTracker:
        return TextTracker(
            self._decode, params.stop, params.include_stop_str_in_output, params.min_tokens
        )

    def _reject(self, handle: JobHandle, exc: BaseException) -> None:
        handle.put(exc)
        handle.close()

    def _prefill(self, admitted: list[Run]) -> None:
        """Fresh prompts: one pass for all (a prompt over the budget in chunks of its
        own), one sampling pass for their first tokens. Preempted sequences: their tokens
        so far go back into the cache, and decoding picks up where it stopped."""
        fresh = [r for r in admitted if r.fresh]
        resumed = [s for r in admitted if not r.fresh for s in r.live_seqs]
        for seq in resumed:
            self.blocks.allocate(seq.table, len(seq.tokens))
            self._fill(seq, seq.tokens[:-1])
            seq.length, seq.last, seq.on_device = len(seq.tokens) - 1, seq.tokens[-1], False
        if not fresh:
            return
        firsts = [r.seqs[0] for r in fresh]
        for seq in firsts:
            self.blocks.allocate(seq.table, len(seq.tokens) + 1)
        scoring = {id(r.seqs[0]): r for r in fresh if r.job.params.prompt_logprobs is not None}
        logits = self._fill_many(firsts, scoring)
        rows: list[int] = []
        params: list[SamplingParams | None] = []
        generators: list[torch.Generator | None] = []
        for row, run in enumerate(fresh):
            first = run.seqs[0]
            first.length = len(first.tokens)
            for seq in run.seqs[1:]:
                self._fork(first, seq)
            seeded = run.generator if run.job.params.seed is not None else None
            for _ in run.seqs:
                rows.append(row)
                params.append(run.job.params)
                generators.append(seeded)
            run.fresh = False
        seqs = [(r, s) for r in fresh for s in r.seqs]
        picked = sample_rows(
            logits[to_device(self.device, rows)],
            params,
            generators,
            self._shared,
            self.history,
            [s.history for _, s in seqs],
            [r.stop_ids for r, _ in seqs],
        )
        for run in fresh:
            for seq in run.seqs:
                seq.on_device = True
            if run.max_tokens == 0:  # echo's scoring alone: nothing generated
                run.handle.put(scored_only(run, self.blocks))
        # the first tokens stay on the device: the next launch reads them from there and
        # the host turns them into text after it (see _loop)
        scores = StepScores.asked(seqs)
        if scores is not None:
            scores.add(logits[to_device(self.device, rows)], picked)
        self._prefilled.append(Step(seqs, picked[None], scores))

    def _fill_many(self, seqs: list[Seq], scoring: dict[int, Run]) -> torch.Tensor:
        """Prefill whole prompts, packed while they fit the budget; last logits of each.
        A prompt to score (``scoring``: its run by the sequence's id) goes alone, with the
        logits of every position, and its run gets the prompt's entries."""
        out: list[torch.Tensor] = []
        group: list[SeqInput] = []
        size = 0
        alone = [s for s in seqs if len(s.tokens) > self.prefill_budget or id(s) in scoring]
        for seq in alone:
            run = scoring.get(id(seq))
            if run is None:
                out.append(self._fill(seq, seq.tokens))
                continue
            full = self._fill(seq, seq.tokens, every=True)
            k = run.job.params.prompt_logprobs or 0
            run.prompt_scores = prompt_entries(self.namer, full, seq.tokens, k)
            out.append(full[-1:])
        for seq in seqs:
            if id(seq) in {id(s) for s in alone}:
                continue
            full = size + len(seq.tokens) > self.prefill_budget or len(group) == PREFILL_SEQS
            if full and group:
                out.append(self.runner.forward(group))
                group, size = [], 0
            group.append(SeqInput(seq.tokens, 0, seq.table.blocks))
            size += len(seq.tokens)
        if group:
            out.append(self.runner.forward(group))
        # restore the order of ``seqs``: long prompts went first
        order = alone + [s for s in seqs if all(s is not a for a in alone)]
        logits = torch.cat(out)
        index = {id(s): i for i, s in enumerate(order)}
        return logits[to_device(self.device, [index[id(s)] for s in seqs])]

    def _fill(self, seq: Seq, tokens: list[int], every: bool = False) -> torch.Tensor:
        """Run ``tokens`` into the cache from position 0 in budget-sized chunks; the last
        logits, or (``every``) those of every position."""
        logits, parts = torch.empty(0), []
        for start in range(0, len(tokens), self.prefill_budget):
            chunk = [SeqInput(tokens[start : start + self.prefill_budget], start, seq.table.blocks)]
            if every:
                parts.append(self.runner.forward_eager(chunk, every=True))
            else:
                logits = self.runner.forward(chunk)
        return torch.cat(parts) if every else logits

    def _fork(self, first: Seq, seq: Seq) -> None:
        """Another choice of the same prompt: share its full blocks, copy the last one."""
        seq.table = self.blocks.fork(first.table, first.length)
        self.blocks.allocate(seq.table, first.length + 1)
        full, rows = divmod(first.length, self.blocks.block_size)
        if rows:
            self.cache.copy_block(first.table.blocks[full], seq.table.blocks[full], rows)
        seq.length = first.length

    # decoding

    def _steps(self, running: list[Run]) -> int:
        """Steps for the next launch: ``steps_per_launch``, fewer near the context's end."""
        room = min(
            (self.max_context - 1 - s.length for r in running for s in r.live_seqs), default=1
        )
        return max(1, min(self.steps_per_launch, room))

    def _reserve(self, running: list[Run], steps: int = 1) -> bool:
        """Give each decoding sequence the blocks its next ``steps`` positions need."""
        try:
            for run in running:
                for seq in run.live_seqs:
                    if seq.length + 1 < self.max_context:
                        self.blocks.allocate(seq.table, seq.length + steps)
        except OutOfBlocks:
            return False
        return True

    def _preempt_until_fits(self, running: list[Run]) -> list[Run]:
        """Send the newest runs back to the queue (their tokens are kept and recomputed
        when blocks free up) until the others can take their next step."""
        while running and not self._reserve(running):
            # the newest batch line goes first, then the newest interactive job
            victim = max(range(len(running)), key=lambda i: (running[i].handle.background, i))
            victim = running.pop(victim)
            for seq in victim.seqs:
                self.blocks.free(seq.table)
            self.preemptions += 1
            log.info(
                "KV cache full (%d blocks): preempted %s after %d tokens; it resumes when "
                "blocks free up",
                self.blocks.num_blocks,
                victim.job.id,
                victim.generated,
            )
            self._waiting.insert(0, victim)
        return running

    def _drop_cancelled(self, run: Run) -> bool:
        cancelled = self.forget_cancel(run.job.id)
        if cancelled:
            self._end(run)
        return cancelled

    def _end_finished(self, running: list[Run]) -> list[Run]:
        for run in running:
            if run.done:
                self._end(run)
        return [r for r in running if not r.done]

    def _launch(self, running: list[Run], previous: list[Step], steps: int = 1) -> Step | None:
        """Queue ``steps`` decode steps for every live sequence; returns without waiting.
        A sequence's input is its last token on the host, or, while that is still on its
        way, the token in ``previous`` (the launched steps not read yet)."""
        # a sequence whose launched steps already reach the context's end only waits for
        # their tokens
        live = [(r, s) for r in running for s in r.live_seqs if s.length + 1 < self.max_context]
        if self.priority.pauses_background(any(not r.handle.background for r, _ in live)):
            live = [(r, s) for r, s in live if not r.handle.background]  # they sit out
        if not live:
            return None
        rows = {id(s): i for i, (_, s) in enumerate(p for step in previous for p in step.live)}
        tokens = to_device(self.device, [s.last for _, s in live])
        from_device = [s.on_device and id(s) in rows for _, s in live]
        if previous and any(from_device):
            index = to_device(self.device, [rows.get(id(s), 0) for _, s in live])
            lasts = torch.cat([step.picked[-1] for step in previous])
            tokens = torch.where(
                to_device(self.device, from_device, torch.bool), lasts[index], tokens
            )
        inputs = [SeqInput([], s.length, s.table.blocks) for _, s in live]
        sample = BatchSampler(
            [r.job.params for r, _ in live],
            [r.generator if r.job.params.seed is not None else None for r, _ in live],
            self._shared,
            self.device,
            history=self.history,
            rows=[s.history for _, s in live],
            stop_ids=[r.stop_ids for r, _ in live],
        )
        scores = StepScores.asked(live)
        scored = sample if scores is None else scores.wrap(sample)
        picked = self.runner.decode_steps(tokens, inputs, steps, scored)
        for _, s in live:
            s.length += steps
            s.on_device = True
        return Step(live, picked, scores)

    def _finish_step(self, step: Step) -> None:
        """Wait for a launched run of steps; emit each job's new text and finish reasons,
        one event a job for the whole run of steps."""
        picked = step.tokens()  # (steps, B)
        self.clock.lap("wait")
        runs: dict[int, tuple[Run, dict[int, int]]] = {}
        for row, (run, s) in enumerate(step.live):
            if run.ended or s.finish is not None:
                continue
            runs.setdefault(id(run), (run, {}))[1][id(s)] = row
        columns = list(zip(*picked, strict=True))  # per row: its token at each step
        scores = step.scores.entries(self.namer) if step.scores is not None else {}
        events = []
        for run, rows in runs.values():
            got = [list(columns[rows[id(s)]]) if id(s) in rows else [] for s in run.seqs]
            entries = [scores.get(rows.get(id(s), -1)) for s in run.seqs]
            event = advance(run, got, self.max_context, self.blocks, entries)
            if event:
                events.append((run.handle, event))
        if events:
            JobHandle.put_all(events[0][0].loop, events)
        self.clock.lap("detokenize")

    def _end(self, run: Run, error: BaseException | None = None) -> None:
        if run.ended:
            return
        run.ended = True
        for seq in run.seqs:
            self.blocks.free(seq.table)
            if seq.history is not None:
                self.history.release(seq.history)
                seq.history = None
        if error is not None:
            run.handle.put(error)
        run.handle.close()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _background(item: Run | tuple[Job, JobHandle]) -> bool:
    """Whether a waiting item is a Batch API line (JobHandle.background)."""
    return (item.handle if isinstance(item, Run) else item[1]).background
