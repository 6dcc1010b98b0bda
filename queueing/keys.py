"""Every Redis key, stream, group and channel name tokenrelay uses.

All keys of one model carry the hash tag ``{m:NAME}`` so that, on Redis Cluster, the
model's job stream, chunk channels and per-request keys share one slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GROUP = "workers"

# A model has two job streams: interactive requests, and Batch API lines that workers read
# only with slots interactive jobs leave free.
Lane = Literal["interactive", "batch"]
LANES: tuple[Lane, ...] = ("interactive", "batch")


@dataclass(frozen=True)
class Keys:
    prefix: str = "tr"

    def _model(self, model: str) -> str:
        return f"{self.prefix}:{{m:{model}}}"

    # per model
    def jobs(self, model: str) -> str:
        return f"{self._model(model)}:jobs"

    def batch_jobs(self, model: str) -> str:
        return f"{self._model(model)}:batch-jobs"

    def lane_jobs(self, model: str, lane: Lane) -> str:
        return self.batch_jobs(model) if lane == "batch" else self.jobs(model)

    def dead_letters(self, model: str) -> str:
        return f"{self._model(model)}:dead"

    def alive(self, model: str, worker_id: str) -> str:
        return f"{self.alive_prefix(model)}{worker_id}"

    def alive_prefix(self, model: str) -> str:
        return f"{self._model(model)}:alive:"

    # per request
    def chunks(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:chunks:{request_id}"

    def chunk_log(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:log:{request_id}"

    def result(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:result:{request_id}"

    def cancel(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:cancel:{request_id}"

    def enqueued(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:enq:{request_id}"

    # a stream's resume record (api/resume.py): its job, owner and followers
    def resume(self, model: str, request_id: str) -> str:
        return f"{self._model(model)}:resume:{request_id}"

    # a worker's tokenizer files (queueing/tokenizers.py), named by their digest
    def tokenizer(self, model: str, digest: str) -> str:
        return f"{self._model(model)}:tokenizer:{digest}"

    # files (Files API): a file's keys share the hash tag {f:ID}; the index is one sorted set
    def file_meta(self, file_id: str) -> str:
        return f"{self.prefix}:{{f:{file_id}}}:meta"

    def file_chunk(self, file_id: str, index: int) -> str:
        return f"{self.prefix}:{{f:{file_id}}}:chunk:{index}"

    @property
    def files(self) -> str:
        return f"{self.prefix}:files"

    # batches (Batch API): a batch's keys share the hash tag {b:ID}; the index is one sorted
    # set, the batches not yet ended one set; the RQ queue that runs them has its own name
    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:{{b:{batch_id}}}:meta"

    def batch_lines(self, batch_id: str) -> str:
        return f"{self.prefix}:{{b:{batch_id}}}:lines"

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.prefix}:{{b:{batch_id}}}:lease"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    @property
    def active_batches(self) -> str:
        return f"{self.prefix}:batches:active"

    @property
    def batch_queue(self) -> str:
        """The RQ queue's name (RQ keeps it as ``rq:queue:NAME``)."""
        return f"{self.prefix}-batches"

    # rate limits (per API-key hash, own hash tag: its two counters share a slot)
    def rate(self, ident: str, kind: str) -> str:
        return f"{self.prefix}:{{rl:{ident}}}:{kind}"

    # registry
    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def known_models(self) -> str:
        return f"{self.prefix}:models"

    # browser UI (arena): one stream of votes, each entry with its conversations
    @property
    def ui_votes(self) -> str:
        return f"{self.prefix}:ui:votes"
