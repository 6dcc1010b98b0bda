"""A deterministic engine with no model, for queue, API and fault tests.

Token ``i`` of request ``r`` is ``fake_token(r, i)``, so a client can tell a lost,
duplicated or reordered token from the text alone. Prompts may steer it:
``POISON`` makes the engine raise; ``CRASH`` kills the worker process. A job that sets a
sampling extra (penalties, logit_bias, ...) is answered by fake_words.py's tiny model.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from tokenrelay.queueing.messages import ChoiceDelta, Job

from .engine import Engine, EngineEvent, InvalidRequest, JobHandle
from .fake_words import generate_words, uses_words

DEFAULT_MAX_TOKENS = 16


def fake_token(request_id: str, index: int, choice: int = 0) -> str:
    tag = hashlib.sha1(f"{request_id}/{choice}".encode()).hexdigest()[:4]
    return f"t{index}.{tag} "


def fake_text(request_id: str, tokens: int, choice: int = 0) -> str:
    return "".join(fake_token(request_id, i, choice) for i in range(tokens))


def prompt_text(job: Job) -> str:
    if job.kind == "completion":
        return job.prompt or ""
    return "\n".join(m.content for m in job.messages or [])


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, token_delay: float = 0.0, max_context: int = 4096) -> None:
        self.token_delay = token_delay
        self.max_context = max_context
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def submit(self, job: Job, *, background: bool = False) -> JobHandle:
        handle = JobHandle(job.id, asyncio.get_running_loop(), background)
        self._tasks[job.id] = asyncio.create_task(self._run(job, handle))
        return handle

    def cancel(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task:
            task.cancel()

    async def _run(self, job: Job, handle: JobHandle) -> None:
        try:
            await self._generate(job, handle)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            handle.put(exc)
        finally:
            self._tasks.pop(job.id, None)
            handle.close()

    async def _generate(self, job: Job, handle: JobHandle) -> None:
        prompt = prompt_text(job)
        if "CRASH" in prompt:
            os._exit(17)
        if "POISON" in prompt:
            raise RuntimeError("poison job: the fake engine refuses this prompt")
        prompt_tokens = len(prompt.split())
        max_tokens = job.params.max_tokens
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if prompt_tokens + max_tokens > self.max_context:
            raise InvalidRequest(
                "prompt and max_tokens exceed the context", "context_length_exceeded"
            )
        if uses_words(job.params):  # the sampling extras: a tiny model (fake_words.py)
            await generate_words(job, handle, prompt, max_tokens, self.token_delay)
            return
        n = job.params.n
        # a continued stream (workers/continuation.py) goes on from the tokens already sent
        start = getattr(job, "continued_tokens", 0)
        if start and job.params.max_tokens is None:
            max_tokens -= start
        if max_tokens == 0:  # echo alone: the prompt is the answer
            deltas = [ChoiceDelta(index=c, finish_reason="length") for c in range(n)]
            handle.put(EngineEvent(deltas, prompt_tokens, 0))
        for i in range(start, start + max_tokens):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            last = i == start + max_tokens - 1
            deltas = [
                ChoiceDelta(
                    index=c, text=fake_token(job.id, i, c), finish_reason="length" if last else None
                )
                for c in range(n)
            ]
            handle.put(EngineEvent(deltas, prompt_tokens + start, (i + 1 - start) * n))
