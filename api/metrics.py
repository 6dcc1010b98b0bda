"""Prometheus metrics of one API process, named as vLLM names its own (``tokenrelay:``
instead of ``vllm:``), so the dashboards people already have need only a prefix change.

Latencies and token counts are measured here, where each request's chunks are relayed:
time to first token and end-to-end latency include the time the job waited in the queue.
Queue and worker gauges are read from Redis at scrape time, so every API process reports
the same system-wide values for them (take ``max`` across API instances, not ``sum``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenrelay.queueing.batch_status import BatchesStatus
from tokenrelay.queueing.messages import Chunk
from tokenrelay.queueing.status import ModelStatus, Status

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 60, 120, 240, 480, 960)

# (name, help, field of ModelStatus): gauges read from Redis at scrape time, per model
QUEUE_GAUGES = (
    (
        "tokenrelay:num_requests_running",
        "Interactive jobs a worker has taken and not finished.",
        "running",
    ),
    (
        "tokenrelay:num_requests_waiting",
        "Interactive jobs queued, not yet taken by a worker.",
        "queued",
    ),
    (
        "tokenrelay:queue_lag_seconds",
        "Age of the oldest job no worker has taken yet (0 when none waits).",
        "oldest_queued_s",
    ),
    (
        "tokenrelay:num_batch_requests_running",
        "Batch API lines a worker has taken and not finished.",
        "batch_running",
    ),
    (
        "tokenrelay:num_batch_requests_waiting",
        "Batch API lines queued on the batch lane, not yet taken by a worker.",
        "batch_queued",
    ),
    ("tokenrelay:workers", "Live workers (fresh heartbeat) serving the model.", "workers"),
    ("tokenrelay:dead_letters", "Jobs in the model's dead-letter stream.", "dead_letters"),
    (
        "tokenrelay:generation_tokens_per_second",
        "Completion tokens per second over the last few seconds, all workers.",
        "tokens_per_s",
    ),
)


class QueueCollector(Collector):
    """Turns the latest snapshot into gauges; ``status`` is set just before each scrape."""

    def __init__(self) -> None:
        self.status: Status | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tokenrelay:redis_up", "1 when Redis answered this scrape.")
        up.add_metric([], 0 if self.status is None else 1)
        yield up
        models: list[ModelStatus] = self.status.models if self.status else []
        for name, help_text, field in QUEUE_GAUGES:
            gauge = GaugeMetricFamily(name, help_text, labels=["model"])
            for m in models:
                gauge.add_metric([m.name], float(getattr(m, field)))
            yield gauge
        if self.status and self.status.batches:
            yield from batch_gauges(self.status.batches)


BATCH_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")


def batch_gauges(batches: BatchesStatus) -> Iterator[Metric]:
    """The batches not yet ended, their lines, and the RQ queue that runs them."""
    by_status = GaugeMetricFamily(
        "tokenrelay:batches", "Batches not yet ended, by status.", labels=["status"]
    )
    for status in BATCH_STATUSES:
        by_status.add_metric([status], sum(b.status == status for b in batches.active))
    yield by_status
    lines = GaugeMetricFamily(
        "tokenrelay:batch_lines",
        "Lines of the batches not yet ended: all of them, answered, failed.",
        labels=["state"],
    )
    for state in ("total", "completed", "failed"):
        lines.add_metric([state], sum(getattr(b, state) for b in batches.active))
    yield lines
    q = batches.queue
    jobs = GaugeMetricFamily(
        "tokenrelay:batch_jobs", "Batch jobs on the RQ queue, by state.", labels=["state"]
    )
    for state in ("queued", "running", "failed"):
        jobs.add_metric([state], getattr(q, state))
    yield jobs
    workers = GaugeMetricFamily("tokenrelay:batch_workers", "Batch workers registered with RQ.")
    workers.add_metric([], q.workers)
    yield workers


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "tokenrelay:time_to_first_token_seconds",
            "From the request's arrival to its first token, queue wait included.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tokenrelay:time_per_output_token_seconds",
            "Mean time between output tokens of a request, after the first.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tokenrelay:e2e_request_latency_seconds",
            "From the request's arrival to its last token.",
            ["model"],
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokenrelay:prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "tokenrelay:generation_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.successes = Counter(
            "tokenrelay:request_success", "Requests answered in full.", ["model"], registry=r
        )
        self.errors = Counter(
            "tokenrelay:request_errors",
            "Requests answered with an error, by its code (overloaded, model_not_found, ...).",
            ["type"],
            registry=r,
        )
        self.queue = QueueCollector()
        r.register(self.queue)

    def start(self, model: str) -> RequestTimer:
        return RequestTimer(self, model)

    def error(self, code: str | None) -> None:
        self.errors.labels(type=code or "unknown").inc()

    async def render(self, status: Callable[[], Awaitable[Status]]) -> bytes:
        try:
            self.queue.status = await status()
        except Exception:  # Redis down: the API's own metrics still go out, redis_up 0
            self.queue.status = None
        return generate_latest(self.registry)


class RequestTimer:
    """Follows one request's chunks and records its latencies and tokens when it ends."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.start = time.monotonic()
        self.first: float | None = None

    def chunk(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if self.first is None and any(c.text for c in chunk.choices):
            self.first = now
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        if chunk.error:
            self.metrics.error(chunk.error.code or chunk.error.type)
        elif chunk.done and chunk.usage:
            self._finished(now, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)

    def _finished(self, now: float, prompt: int, completion: int) -> None:
        m, model = self.metrics, self.model
        m.e2e.labels(model).observe(now - self.start)
        m.prompt_tokens.labels(model).inc(prompt)
        m.generation_tokens.labels(model).inc(completion)
        m.successes.labels(model).inc()
        if self.first is not None and completion > 1:
            m.tpot.labels(model).observe((now - self.first) / (completion - 1))


def count_error(request: Request, code: str | None) -> None:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.error(code)
