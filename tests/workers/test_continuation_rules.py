"""When a re-delivered stream can be continued, and what the continued job looks like."""

from __future__ import annotations

import time

from tokenrelay.queueing.messages import Usage
from tokenrelay.workers.continuation import ContinuedJob, Sent, continued, impossible

from ..queueing.test_jobs import make_job

TTL = 600


def _sent(tokens: int = 5, **fields: object) -> Sent:
    usage = Usage(prompt_tokens=7, completion_tokens=tokens, total_tokens=7 + tokens)
    return Sent(**{"next_seq": 3, "text": "a b c", "usage": usage, **fields})  # type: ignore[arg-type]


def test_an_empty_log_means_nothing_was_sent_unless_it_may_have_expired() -> None:
    young = make_job(max_tokens=20)
    assert impossible(young, Sent(), TTL) is None  # runs again from the start
    old = young.model_copy(update={"created": int(time.time()) - TTL - 5})
    assert impossible(old, Sent(), TTL) == "log expired"


def test_what_cannot_be_continued() -> None:
    assert impossible(make_job(n=2), _sent(), TTL) == "n > 1"
    assert impossible(make_job(frequency_penalty=0.5), _sent(), TTL) == "presence/frequency penalty"
    assert impossible(make_job(presence_penalty=-1), _sent(), TTL) == "presence/frequency penalty"
    assert impossible(make_job(repetition_penalty=1.2, min_tokens=9), _sent(), TTL) is None
    assert impossible(make_job(), _sent(complete=False), TTL) == "log incomplete"
    assert impossible(make_job(), _sent(usage=None), TTL) == "log incomplete"
    assert impossible(make_job(), _sent(), TTL) is None


def test_a_continued_job_asks_for_what_is_left_and_counts_everything() -> None:
    job = make_job(max_tokens=20, temperature=0.7, seed=3, min_tokens=8)
    again = continued(job, _sent(tokens=5))
    assert again.params.min_tokens == 3
    assert isinstance(again, ContinuedJob)
    assert (again.id, again.prompt, again.deadline) == (job.id, job.prompt, job.deadline)
    assert again.params.max_tokens == 15
    assert (again.params.temperature, again.params.seed) == (0.7, 3)
    assert again.continued_text == "a b c"
    engine = Usage(prompt_tokens=10, completion_tokens=15, total_tokens=25)  # prompt + sent
    assert again.usage(engine) == Usage(prompt_tokens=7, completion_tokens=20, total_tokens=27)
    assert job.params.max_tokens == 20  # the original is untouched
