"""A load/fault driver with a ledger: nothing lost, nothing duplicated, nothing let in.

Every request goes to the fake engine, whose text is a function of the request id
(``fake_text(id, max_tokens)``), so a client can tell a lost, duplicated or reordered token
from the text alone. Each scenario drives real ``tokenrelay api`` and ``tokenrelay worker
--engine fake`` processes (tests/stack.py) with asyncio + httpx, injects its faults, and then
balances the books:

- requests accepted == completed + errored + cancelled (the rest are ``lost``);
- a stream's chunks share one id and created; its text is the exact fake text, or a prefix of
  it followed by an error event; it always ends with [DONE] and nothing after it;
- at the end no job is pending in the consumer group and the job stream is empty;
- every per-request key (chunk log, result, cancel, enqueued marker) has a TTL.

The same code runs at small size under pytest (tests/faults/test_faults.py) and at full size
through ``python -m tests.faults.run --full`` (bench/faults.sh).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from tokenrelay.queueing.keys import GROUP, Keys
from tokenrelay.workers.fake_engine import fake_text

MODEL = "fake"
ARTIFACTS = Path("test-artifacts/faults")
PER_REQUEST = (":log:", ":result:", ":cancel:", ":enq:")


@dataclass
class Outcome:
    """What one client saw."""

    index: int
    stream: bool
    max_tokens: int
    status: int = 0
    id: str = ""
    ids: set[str] = field(default_factory=set)
    created: set[int] = field(default_factory=set)
    content: str = ""
    error: dict | None = None
    done: bool = False
    after_done: int = 0
    retry_after: str | None = None
    exception: str = ""
    cancelled: bool = False  # the client hung up on purpose
    marker: str = ""  # appended to the prompt (e.g. POISON)
    started: float = 0.0
    finished: float = 0.0

    @property
    def latency(self) -> float:
        return self.finished - self.started


@dataclass
class Summary:
    scenario: str
    size: str
    requests: int = 0
    accepted: int = 0
    rejected: int = 0  # 429/503 at the door: never accepted
    completed: int = 0
    errored: int = 0
    cancelled: int = 0
    lost: int = 0
    duplicated: int = 0  # wrong, duplicated or reordered text, or a mixed-up stream
    faults: int = 0
    p99_cancel_latency_s: float | None = None
    p99_reject_latency_s: float | None = None
    p99_ack_seen_s: float | None = None  # hang-up to the job's ack, as polled by the driver
    queued_cancels: int = 0
    started_after_cancel: int = 0
    pending: int = 0
    redelivered: int = 0  # requests whose chunk log shows a second attempt (a re-run)
    continued: int = 0  # streams another worker continued after their worker was lost
    dead_lettered: int = 0
    max_latency_s: float = 0.0  # the slowest request, first byte sent to its last
    notes: dict = field(default_factory=dict)  # scenario-specific figures
    xlen: int = 0
    leaked_keys: int = 0
    elapsed_s: float = 0.0
    slow_cancels: list[dict] = field(default_factory=list)
    slow_rejects: list[dict] = field(default_factory=list)
    driver_max_lag_s: float = 0.0
    queued_then_started: int = 0  # queued at the hang-up, started before its cancel key was set
    max_queued_then_started_s: float | None = None  # hang-up to its chunk log's last entry
    violations: list[str] = field(default_factory=list)
    # Speed targets missed (a p99, a slowdown, an exit time): the bench (run.py) fails on them,
    # CI does not, since they measure the machine as much as the code.
    slow: list[str] = field(default_factory=list)

    def line(self) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.0f}ms"

        return (
            f"[{self.scenario}/{self.size}] requests={self.requests} accepted={self.accepted} "
            f"rejected={self.rejected} faults={self.faults} lost={self.lost} "
            f"duplicated={self.duplicated} completed={self.completed} errored={self.errored} "
            f"cancelled={self.cancelled} p99_cancel={f(self.p99_cancel_latency_s)} "
            f"p99_429={f(self.p99_reject_latency_s)} queued_cancels={self.queued_cancels} "
            f"started_after_cancel={self.started_after_cancel} "
            f"queued_then_started={self.queued_then_started} leaked_keys={self.leaked_keys} "
            f"redelivered={self.redelivered} continued={self.continued} "
            f"dead_lettered={self.dead_lettered} "
            f"max_latency={self.max_latency_s:.1f}s {self.notes or ''} "
            f"elapsed={self.elapsed_s:.1f}s violations={len(self.violations)} "
            f"slow={len(self.slow)}"
        )

    def write(self) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.scenario}.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def settle(outcomes: list[Outcome], s: Summary) -> None:
    """Balance the books of the clients' view."""
    s.requests = len(outcomes)
    for o in outcomes:
        tag = f"request {o.index} ({o.id or 'no id'})"
        if o.status in (429, 503) and not o.exception:
            s.rejected += 1
            if not o.retry_after:
                s.violations.append(f"{tag}: {o.status} without Retry-After")
            continue
        s.accepted += 1
        if o.exception:
            s.lost += 1
            s.violations.append(f"{tag}: lost: {o.exception}")
            continue
        if o.cancelled:
            s.cancelled += 1
            if o.id and not fake_text(o.id, o.max_tokens).startswith(o.content):
                s.duplicated += 1
                s.violations.append(f"{tag}: cancelled stream text is not a prefix: {o.content!r}")
            continue
        if o.status != 200:
            s.errored += 1  # an error answer (e.g. 500 dead_lettered) is not a loss
            continue
        if len(o.ids) != 1 or (o.stream and len(o.created) != 1) or o.after_done:
            s.duplicated += 1
            s.violations.append(
                f"{tag}: ids={o.ids} created={o.created} events after end={o.after_done}"
            )
            continue
        expected = fake_text(o.id, o.max_tokens)
        if o.stream and not o.done:
            s.lost += 1
            s.violations.append(f"{tag}: stream ended without [DONE]")
            continue
        if o.error is None:
            if o.content == expected:
                s.completed += 1
            else:
                s.duplicated += 1
                s.violations.append(f"{tag}: text {o.content!r} != {expected!r}")
        else:
            if expected.startswith(o.content):
                s.errored += 1
            else:
                s.duplicated += 1
                s.violations.append(f"{tag}: errored text is not a prefix: {o.content!r}")
    if s.accepted != s.completed + s.errored + s.cancelled + s.lost + s.duplicated:
        s.violations.append("ledger does not balance")  # a bug in settle() itself


async def check_redis(r: aioredis.Redis, prefix: str, s: Summary, timeout: float = 120) -> None:
    """No pending job, an empty job stream, and a TTL on every per-request key."""
    keys = Keys(prefix)
    deadline = time.monotonic() + timeout
    while True:
        s.xlen = int(await r.xlen(keys.jobs(MODEL)))
        try:
            s.pending = int((await r.xpending(keys.jobs(MODEL), GROUP))["pending"])
        except Exception:
            s.pending = 0  # no group: nothing was ever read
        if (s.xlen == 0 and s.pending == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    if s.xlen or s.pending:
        s.violations.append(f"job stream not drained: XLEN={s.xlen} pending={s.pending}")
    leaked = []
    async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
        if any(p in key for p in PER_REQUEST) and await r.ttl(key) == -1:
            leaked.append(key)
    s.leaked_keys = len(leaked)
    if leaked:
        s.violations.append(f"{len(leaked)} per-request keys without TTL, e.g. {leaked[:3]}")


async def check_logs(r: aioredis.Redis, prefix: str, outcomes: list[Outcome], s: Summary) -> None:
    """From each request's chunk log: a chunk number sent twice within one attempt means the
    job ran twice at once (enqueued twice, or claimed by two workers); a later attempt is a
    re-run, counted in ``redelivered``; a chunk logged by a later delivery under the same
    attempt is a continuation (the run went on on another worker), counted in
    ``continued``."""
    keys = Keys(prefix)
    for o in outcomes:
        if not o.id:
            continue
        seen: set[tuple[int, int]] = set()
        attempts = {1}
        continued = False
        for _, fields in await r.xrange(keys.chunk_log(MODEL, o.id)):
            chunk = json.loads(fields["c"])
            key = (chunk["attempt"], chunk["seq"])
            if key in seen:
                s.violations.append(f"{o.id}: chunk {key} logged twice: the job ran twice")
            seen.add(key)
            attempts.add(chunk["attempt"])
            continued = continued or int(fields.get("d", 0)) > chunk["attempt"]
        s.redelivered += max(attempts) > 1
        s.continued += continued
    s.max_latency_s = max((o.latency for o in outcomes), default=0.0)
