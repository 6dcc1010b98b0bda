"""`tokenrelay status`: models, queues and workers in a table, like `rq info`.

It reads Redis directly (the same snapshot as the API's ``GET /v1/status``), so it works
with no API running and needs no API key: only the Redis URL, which by default it takes
from the runtime file of the `tokenrelay serve` running here (see runtime.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from tokenrelay import runtime
from tokenrelay.queueing.batch_status import BatchesStatus
from tokenrelay.queueing.connection import RedisSettings, connect
from tokenrelay.queueing.status import Status, snapshot

CLEAR = "\x1b[H\x1b[2J"
MODEL_HEADER = (
    "MODEL WORKERS QUEUED RUNNING BATCH-QUEUED BATCH-RUNNING OLDEST TOKENS/S DEAD".split()
)
BATCH_HEADER = "BATCH STATUS MODEL LINES DONE FAILED AGE".split()
WORKER_HEADER = (
    "WORKER MODELS DEVICE ENGINE WEIGHTS IN-FLIGHT TOKENS/S HEARTBEAT HOST:PID UP VERSION".split()
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        help="the Redis the workers use (default: that of the `tokenrelay serve` running "
        f"here, else {runtime.DEFAULT_REDIS_URL})",
    )
    parser.add_argument("--key-prefix", default="tr", help=argparse.SUPPRESS)
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (2 if given without a number) until Ctrl-C",
    )
    parser.add_argument("--json", action="store_true", help="print the snapshot as JSON")


def run(args: argparse.Namespace) -> None:
    url = runtime.redis_url(args.redis_url)
    settings = RedisSettings(url=url, prefix=args.key_prefix, max_connections=4)
    try:
        asyncio.run(_show(settings, args.watch, args.json))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `tokenrelay status --watch | head`: the reader left. Python's documented idiom:
        # point stdout at devnull so the flush at exit fails no more, and exit quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


async def _show(settings: RedisSettings, watch: float | None, as_json: bool) -> None:
    redis = connect(settings)
    try:
        while True:
            try:
                status = await snapshot(redis, settings.keys)
            except Exception as exc:
                message = (
                    f"tokenrelay status: cannot read Redis at {settings.url}: {exc} "
                    "(pass --redis-url, or start `tokenrelay serve`, which this finds itself)"
                )
                raise SystemExit(message) from exc
            text = status.model_dump_json(indent=2) if as_json else render(status)
            if watch is None:
                print(text)
                return
            print(CLEAR + time.strftime("%H:%M:%S ") + settings.url + "\n\n" + text, flush=True)
            await asyncio.sleep(max(0.2, watch))
    finally:
        await redis.aclose()


def render(status: Status, now: float | None = None) -> str:
    """Two tables: one row per model, one per live worker; a third, of batches, when the
    Batch API has a batch worker or a batch."""
    now = time.time() if now is None else now
    models = [
        [m.name, m.workers, m.queued, m.running, m.batch_queued, m.batch_running,
         f"{m.oldest_queued_s:.1f}s", f"{m.tokens_per_s:.1f}", m.dead_letters]
        for m in status.models
    ]  # fmt: skip
    workers = [
        [w.id, ",".join(w.models), w.device, w.engine, w.weights or "-",
         f"{w.inflight}/{w.capacity}",
         f"{w.tokens_per_s:.1f}", f"{now - w.last_heartbeat:.1f}s ago", f"{w.host}:{w.pid}",
         _duration(now - w.started_at), w.version]
        for w in status.workers
    ]  # fmt: skip
    parts = [
        _table(MODEL_HEADER, models),
        _table(WORKER_HEADER, workers),
        f"{len(status.workers)} workers, {sum(m.queued for m in status.models)} queued, "
        f"{sum(m.running for m in status.models)} running; batch lines: "
        f"{sum(m.batch_queued for m in status.models)} queued, "
        f"{sum(m.batch_running for m in status.models)} running",
    ]
    if status.batches and (status.batches.active or status.batches.queue.workers):
        parts += _batches(status.batches, now)
    return "\n\n".join(parts)


def _batches(batches: BatchesStatus, now: float) -> list[str]:
    rows = [
        [b.id, b.status, b.model or "-", b.total, b.completed, b.failed,
         _duration(now - b.created_at)]
        for b in batches.active
    ]  # fmt: skip
    q = batches.queue
    return [
        _table(BATCH_HEADER, rows),
        f"batch queue {q.name}: {q.queued} queued, {q.running} running, {q.failed} failed; "
        f"{q.workers} batch workers",
    ]


def _table(header: list[str], rows: list[list[object]]) -> str:
    if not rows:
        return f"{header[0]}: none"
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for row in cells:
        first = row[0].ljust(widths[0])
        pairs = zip(row[1:], widths[1:], strict=True)
        rest = [c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in pairs]
        lines.append("  ".join([first, *rest]).rstrip())
    return "\n".join(lines)


def _numeric(cell: str) -> bool:
    return cell.replace(".", "", 1).rstrip("s").isdigit()


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
