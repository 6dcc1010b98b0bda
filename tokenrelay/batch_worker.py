"""`tokenrelay batch-worker`: an RQ worker that runs Batch API jobs (api/batch_job.py).

Each batch is one RQ job on the ``PREFIX-batches`` queue. The worker forks a work horse per
batch, as RQ does, and keeps the job's heartbeat while the horse runs it. Two changes to
RQ's defaults make a lost batch come back in seconds rather than minutes: the job's
heartbeat lasts three ``--batch-heartbeat-interval``s (RQ adds a minute), and an idle worker
looks for lost jobs every ``--batch-maintenance-interval``. A stopping worker (SIGTERM) stops its
batch at once, rather than after the batch's hours: RQ queues it again and it resumes
wherever a batch worker runs, from the progress kept in Redis. A work horse dies with its
worker (on Linux): a worker SIGKILLed (or OOM-killed) would otherwise leave its horse running
the batch on, unsupervised and in its own process group, past the `tokenrelay serve` that
started the worker; as it is, the batch resumes on the next worker like any lost batch.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import sys
from typing import Any

from rq import Worker
from rq.serializers import JSONSerializer

from . import runtime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="the Redis the API and the workers use (default: that of the `tokenrelay serve` "
        f"running here, else {runtime.DEFAULT_REDIS_URL})",
    )
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)
    parser.add_argument(
        "--lines-in-flight",
        type=int,
        default=32,
        help="lines of one batch queued or running on the models at once",
    )
    parser.add_argument(
        "--batch-heartbeat-interval",
        type=int,
        default=10,
        help="seconds between heartbeats of a running batch; a batch whose worker is lost "
        "runs again after three of them",
    )
    parser.add_argument(
        "--batch-maintenance-interval",
        type=int,
        default=30,
        help="seconds between an idle worker's looks for batches whose worker was lost",
    )
    parser.add_argument(
        "--max-prompt-chars",
        type=int,
        default=200_000,
        help="most characters in a line's prompt or messages, as the API's flag of the same "
        "name (and the same variable): a longer line fails with prompt_too_long (0: no bound)",
    )
    parser.add_argument(
        "--burst", action="store_true", help="run the queued batches, then exit (for scripts)"
    )


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """In a forked child: be SIGKILLed when the parent dies, or exit now if it already has.
    Linux only (prctl); elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:  # it died between the fork and the prctl
        os._exit(1)


class BatchWorker(Worker):
    """RQ's forking worker, with a short job heartbeat, an immediate stop, and a work horse
    that dies with it."""

    def fork_work_horse(self, job: Any, queue: Any) -> None:
        self._worker_pid = os.getpid()
        super().fork_work_horse(job, queue)

    def main_work_horse(self, job: Any, queue: Any) -> None:
        die_with_parent(self._worker_pid)
        super().main_work_horse(job, queue)

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return int(self.job_monitoring_interval) * 3

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self._stopping = True
        if self.horse_pid:
            self.log.info("Worker %s: stopping its batch; it resumes on the next worker", self.name)
            self.kill_horse()

    def handle_job_failure(self, job: Any, queue: Any, *args: Any, **kwargs: Any) -> None:
        """A batch stopped because this worker is stopping (a restart, a deploy) goes back
        to the queue without using one of its retries: those are for batches that fail."""
        if getattr(self, "_stopping", False) and job.retries_left is not None:
            job.retries_left += 1
        super().handle_job_failure(job, queue, *args, **kwargs)


def run(args: argparse.Namespace) -> None:
    from tokenrelay.api import batch_job
    from tokenrelay.api.batch_runner import RunnerSettings
    from tokenrelay.queueing.batch_queue import batch_queue, sync_connect
    from tokenrelay.queueing.connection import RedisSettings

    for name in ("lines_in_flight", "batch_heartbeat_interval", "batch_maintenance_interval"):
        if getattr(args, name) < 1:
            raise SystemExit(
                f"tokenrelay batch-worker: --{name.replace('_', '-')} must be 1 or more"
            )
    redis_settings = RedisSettings(url=runtime.redis_url(args.redis_url), prefix=args.key_prefix)
    batch_job.configure(
        RunnerSettings(
            redis=redis_settings,
            lines_in_flight=args.lines_in_flight,
            max_prompt_chars=args.max_prompt_chars,
            lease_ttl=3.0 * args.batch_heartbeat_interval,
        )
    )
    connection = sync_connect(redis_settings)
    try:
        connection.ping()
    except Exception as exc:
        raise SystemExit(
            f"tokenrelay batch-worker: cannot reach Redis at {redis_settings.url}: {exc} "
            "(pass --redis-url, or start `tokenrelay serve`, which this finds itself)"
        ) from exc
    worker = BatchWorker(
        [batch_queue(connection, redis_settings.keys)],
        connection=connection,
        serializer=JSONSerializer,
        job_monitoring_interval=args.batch_heartbeat_interval,
        maintenance_interval=args.batch_maintenance_interval,
        # RQ blocks for a job for worker_ttl - 15 s: wake up for maintenance in time.
        worker_ttl=args.batch_maintenance_interval + 15,
    )
    worker.work(burst=args.burst, logging_level=None)
