"""A stream survives its worker's death: the worker that reclaims it continues it.

The chunk log holds every chunk the dead worker sent, each entry with the token counts so
far (queueing/chunks.py). The new worker prefills the prompt followed by the text already
sent and keeps generating with the same sampling parameters and the remaining
``max_tokens``; its chunks keep the run's ``attempt`` and are numbered after the last one
sent, so the client's reader sees one stream that merely paused. Usage is the original
prompt's tokens and every completion token, the dead worker's included.

Where that is impossible the stream ends with ``worker_lost`` (counted in the API's
``tokenrelay:request_errors{type="worker_lost"}``):

- ``log expired``: the job is older than the log's TTL and its log is gone, so tokens may
  have been sent that nobody can read back;
- ``n > 1``: the choices share one prompt in the engine; each would need its own prefix;
- ``presence/frequency penalty``: they count the tokens generated so far, and the sent ones
  would be prompt to the continuation (the repetition penalty, over prompt and generated
  tokens alike, continues faithfully; ``min_tokens`` is reduced by the tokens sent);
- ``log incomplete``: a chunk is missing, or the entries carry no token counts (written by a
  release before continuation).

Greedy decoding continues exactly the text an uninterrupted run would have produced
(tested with SmolLM2); a sampled stream continues as a valid sample of the same
distribution, but not the same draw a seed would have given without the interruption.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from tokenrelay.queueing.chunks import ChunkPublisher
from tokenrelay.queueing.keys import Keys
from tokenrelay.queueing.messages import ChoiceDelta, ErrorInfo, Job, Result, Usage

log = logging.getLogger(__name__)


class ContinuedJob(Job):
    """A job resumed after the text it already sent; never crosses Redis. Engines see a
    ``Job`` whose prompt continues with ``continued_text`` (workers/prompts.py) and whose
    ``max_tokens`` is what is left."""

    continued_text: str = ""
    continued_tokens: int = 0  # completion tokens the earlier worker generated
    base_prompt_tokens: int = 0  # the original prompt's tokens

    def usage(self, engine: Usage) -> Usage:
        """The client's usage from the engine's: its prompt counts the continued text."""
        completion = self.continued_tokens + engine.completion_tokens
        prompt = self.base_prompt_tokens
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


@dataclass
class Sent:
    """What earlier deliveries of a job logged: one run's chunks, in order."""

    attempt: int = 1
    next_seq: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None  # token counts at the last logged chunk
    done: bool = False
    complete: bool = True  # every seq from 0 present, each with token counts

    @property
    def any(self) -> bool:
        return self.next_seq > 0


async def read_sent(redis: aioredis.Redis, keys: Keys, job: Job) -> Sent:
    """The run the job's chunk log holds (its newest attempt)."""
    entries = await redis.xrange(keys.chunk_log(job.model, job.id))
    rows = [(json.loads(f["c"]), f) for _, f in entries]
    if not rows:
        return Sent()
    attempt = max(c["attempt"] for c, _ in rows)
    rows = sorted((r for r in rows if r[0]["attempt"] == attempt), key=lambda r: r[0]["seq"])
    sent = Sent(attempt=attempt)
    for chunk, fields in rows:
        if chunk["seq"] != sent.next_seq or "t" not in fields:
            sent.complete = False
        sent.next_seq = chunk["seq"] + 1
        sent.done = sent.done or chunk.get("done", False)
        for choice in chunk.get("choices", []):
            sent.text += choice.get("text", "")
            sent.finish_reason = choice.get("finish_reason") or sent.finish_reason
        if "t" in fields:
            prompt, completion = int(fields["p"]), int(fields["t"])
            sent.usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
            )
    return sent


def impossible(job: Job, sent: Sent, chunk_ttl: float) -> str | None:
    """Why ``job`` (a stream, re-delivered) cannot continue from ``sent``; None if it can
    (or if nothing was sent, so it simply runs again)."""
    if not sent.any:
        # The log's TTL is renewed with every chunk, so a job younger than it that had sent
        # tokens still has its log: empty means nothing was sent.
        return "log expired" if time.time() - job.created > chunk_ttl else None
    if job.params.n > 1:
        return "n > 1"
    if job.params.presence_penalty or job.params.frequency_penalty:
        # they count the tokens generated so far, which the continuation would not
        return "presence/frequency penalty"
    if not sent.complete or sent.usage is None:
        return "log incomplete"
    return None


def continued(job: Job, sent: Sent) -> ContinuedJob:
    """``job`` resumed after ``sent``: same parameters, the remaining ``max_tokens``."""
    assert sent.usage is not None
    params = job.params.model_copy()
    if params.max_tokens is not None:
        params.max_tokens = max(1, params.max_tokens - sent.usage.completion_tokens)
    params.min_tokens = max(0, params.min_tokens - sent.usage.completion_tokens)
    params.prompt_logprobs = None  # echo's prompt scores went out with the first tokens
    data = job.model_dump()
    data["params"] = params
    return ContinuedJob(
        **data,
        continued_text=sent.text,
        continued_tokens=sent.usage.completion_tokens,
        base_prompt_tokens=sent.usage.prompt_tokens,
    )


async def resume(
    redis: aioredis.Redis, keys: Keys, job: Job, publisher: ChunkPublisher, chunk_ttl: float
) -> Job | None:
    """Prepare a re-delivered job: the job to run (itself, or continued after what it
    sent, with ``publisher`` numbering after it), or None when it needs no run (it had
    ended, or cannot continue and was told ``worker_lost``)."""
    sent = await read_sent(redis, keys, job)
    if sent.done:  # its worker died between the last chunk and the ack
        log.info("job %s had already ended; acknowledging it", job.id)
        return None
    if not job.stream:
        # A whole answer: the API starts over on the newer attempt, so run it again.
        await publisher.reset_log()
        return job
    why = impossible(job, sent, chunk_ttl)
    if why is not None:
        log.warning("job %s cannot continue (%s): worker_lost", job.id, why)
        await publisher.send(error=_worker_lost(why))
        return None
    if not sent.any:
        return job  # nothing was shown: it runs again, invisibly to the client
    publisher.attempt = sent.attempt  # the same run, continued
    publisher.seq = publisher.first_seq = sent.next_seq
    assert sent.usage is not None
    if sent.finish_reason is not None:  # every token was out; only the last chunk was not
        result = Result(
            id=job.id,
            choices=[ChoiceDelta(index=0, text=sent.text, finish_reason=sent.finish_reason)],
            usage=sent.usage,
        )
        await publisher.send(usage=sent.usage, result=result)
        return None
    log.info(
        "job %s continues after %d tokens (chunk %d on)",
        job.id,
        sent.usage.completion_tokens,
        sent.next_seq,
    )
    return continued(job, sent)


def _worker_lost(why: str) -> ErrorInfo:
    return ErrorInfo(
        message=f"The worker serving this stream died after it had sent tokens, and the "
        f"stream cannot be continued ({why}); retry the request.",
        type="server_error",
        code="worker_lost",
        status=502,
    )
