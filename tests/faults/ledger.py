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
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from tokenrelay.queueing.keys import GROUP, Keys
from tokenrelay.queueing.messages import Job
from tokenrelay.workers.fake_engine import fake_text

from ..stack import Process, Stack

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
    xlen: int = 0
    leaked_keys: int = 0
    elapsed_s: float = 0.0
    slow_cancels: list[dict] = field(default_factory=list)
    slow_rejects: list[dict] = field(default_factory=list)
    driver_max_lag_s: float = 0.0
    queued_then_started: int = 0  # queued at the hang-up, started before its cancel key was set
    max_queued_then_started_s: float | None = None  # hang-up to its chunk log's last entry
    violations: list[str] = field(default_factory=list)

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
            f"elapsed={self.elapsed_s:.1f}s violations={len(self.violations)}"
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


def body(index: int, max_tokens: int, stream: bool) -> dict:
    prompt = f"req-{index}"
    if stream:
        return {
            "model": MODEL,
            "stream": True,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}


def _path(stream: bool) -> str:
    return "/v1/chat/completions" if stream else "/v1/completions"


async def _read_stream(r: httpx.Response, out: Outcome, hang_up_after: int | None) -> None:
    """Read SSE events into ``out``; stop after ``hang_up_after`` content events if given."""
    seen = 0
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if out.done:
            out.after_done += 1
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            out.done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            if out.error is not None:
                out.after_done += 1  # two error events
            out.error = event["error"]
            continue
        if out.error is not None:
            out.after_done += 1  # content after an error event
        out.id = event["id"]
        out.ids.add(event["id"])
        out.created.add(event["created"])
        for choice in event["choices"]:
            if text := choice["delta"].get("content"):
                out.content += text
                seen += 1
        if hang_up_after is not None and seen >= hang_up_after:
            return


async def request(
    client: httpx.AsyncClient,
    out: Outcome,
    *,
    hang_up_after: int | None = None,
    give_up_after: float | None = None,
    on_hang_up: asyncio.Queue | None = None,
) -> None:
    """One client. ``give_up_after``: hang up if no response headers came by then (a client
    leaving while its job is queued); ``hang_up_after``: hang up after that many tokens."""
    out.started = time.monotonic()
    try:
        req = client.build_request(
            "POST", _path(out.stream), json=body(out.index, out.max_tokens, out.stream)
        )
        sending = asyncio.ensure_future(client.send(req, stream=True))
        if give_up_after is not None:
            done, _ = await asyncio.wait({sending}, timeout=give_up_after)
            if not done:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
                out.cancelled = True
                out.finished = time.monotonic()
                if on_hang_up is not None:
                    on_hang_up.put_nowait((out, out.finished))
                return
        r = await sending
        try:
            out.status = r.status_code
            out.retry_after = r.headers.get("retry-after")
            if r.status_code != 200:
                out.error = json.loads(await r.aread()).get("error")
            elif not out.stream:
                data = json.loads(await r.aread())
                out.id = data["id"]
                out.ids.add(data["id"])
                out.content = data["choices"][0]["text"]
            else:
                await _read_stream(r, out, hang_up_after)
                if hang_up_after is not None and not out.done and out.error is None:
                    out.cancelled = True
        finally:
            await r.aclose()
        out.finished = time.monotonic()
        if out.cancelled and on_hang_up is not None:
            on_hang_up.put_nowait((out, out.finished))
    except Exception as exc:  # a transport error: the ledger counts it as lost
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.finished = out.finished or time.monotonic()


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


async def check_redis(r: aioredis.Redis, prefix: str, s: Summary, timeout: float = 30) -> None:
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


def _redis(stack: Stack) -> aioredis.Redis:
    return aioredis.Redis.from_url(stack.redis_url, decode_responses=True)


def _client(stack: Stack, timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.url,
        timeout=timeout,
        limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200),
    )


async def _loop_lag(s: Summary, tick: float = 0.01) -> None:
    """Record this driver's worst event-loop stall: client-side latencies include it."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(tick)
        s.driver_max_lag_s = max(s.driver_max_lag_s, time.monotonic() - before - tick)


async def _bounded(tasks: list, concurrency: int) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def run(coro) -> None:
        async with sem:
            await coro

    await asyncio.gather(*(run(c) for c in tasks))


# ---------------------------------------------------------------------------------------------
# 1. SIGKILL workers at random moments under load


async def kill_workers(stack: Stack, *, n: int, size: str, seed: int = 1) -> Summary:
    rng = random.Random(seed)
    s = Summary("kill", size)
    started = time.monotonic()
    stack.api()
    flags = ("--fake-token-delay", "0.02", "--heartbeat-interval", "0.25", "--heartbeat-ttl", "1.5")
    workers: list[Process] = [stack.fake_worker(*flags) for _ in range(3)]
    outcomes = [
        Outcome(i, stream=rng.random() < 0.7, max_tokens=rng.randint(20, 60)) for i in range(n)
    ]
    stop = asyncio.Event()

    async def killer() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(0.8, 2.0))
            if stop.is_set():
                return
            alive = [w for w in workers if w.alive()]
            victim = rng.choice(alive)
            await asyncio.to_thread(victim.kill)
            s.faults += 1
            workers.remove(victim)
            workers.append(await asyncio.to_thread(stack.fake_worker, *flags, wait=False))

    async with _client(stack, timeout=120) as client:
        kill_task = asyncio.create_task(killer())
        await _bounded([request(client, o) for o in outcomes], concurrency=30)
        stop.set()
        await kill_task
    settle(outcomes, s)
    r = _redis(stack)
    try:
        await check_redis(r, stack.prefix, s)
    finally:
        await r.aclose()
    s.elapsed_s = time.monotonic() - started
    return s


# ---------------------------------------------------------------------------------------------
# 2. Disconnect storm


async def disconnect_storm(stack: Stack, *, n: int, size: str, seed: int = 2) -> Summary:
    rng = random.Random(seed)
    s = Summary("disconnect", size)
    started = time.monotonic()
    keys = Keys(stack.prefix)
    stack.api()
    flags = ("--fake-token-delay", "0.02", "--limit-worker-concurrency", "4")
    for _ in range(2):
        stack.fake_worker(*flags)
    r = _redis(stack)
    seen: dict[int, tuple[str, str]] = {}  # request index -> (stream entry id, request id)
    stop = asyncio.Event()

    async def watch_stream() -> None:
        while not stop.is_set():
            for eid, fields in await r.xrange(keys.jobs(MODEL)):
                if fields:
                    job = Job.model_validate_json(fields["job"])
                    index = int((job.messages or [])[-1].content.removeprefix("req-"))
                    seen.setdefault(index, (eid, job.id))
            await asyncio.sleep(0.005)

    hang_ups: asyncio.Queue = asyncio.Queue()
    latencies: list[float] = []
    ack_latencies: list[float] = []
    raced: list[float] = []  # hang-up to stop, for jobs queued at the hang-up that started
    queued: list[str] = []  # request ids cancelled while still undelivered
    checks: list[asyncio.Task] = []

    async def follow(out: Outcome, at: float) -> None:
        """After a hang-up: was the job queued (then it must never start) or running (then it
        must stop within 1 s: acked, and its chunk log no longer growing)?"""
        deadline = at + 3
        while out.index not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if out.index not in seen:
            return  # never enqueued (hung up before the API queued it)
        eid, rid = seen[out.index]
        # Running at the hang-up: it had sent tokens, or a worker held it already.
        running = out.status == 200 or bool(
            await r.xpending_range(keys.jobs(MODEL), GROUP, eid, eid, 1)
        )
        while not await r.exists(keys.cancel(MODEL, rid)):
            if time.monotonic() > deadline:
                if await r.exists(keys.result(MODEL, rid)):
                    return  # it finished before the hang-up was noticed
                s.violations.append(f"{rid}: no cancel key 3 s after the hang-up")
                return
            await asyncio.sleep(0.01)
        in_stream = bool(await r.xrange(keys.jobs(MODEL), eid, eid))
        delivered = bool(await r.xpending_range(keys.jobs(MODEL), GROUP, eid, eid, 1))
        if in_stream and not delivered and not await r.exists(keys.chunk_log(MODEL, rid)):
            queued.append(rid)  # checked at the end: its chunk log must never appear
            return
        # The chunk log's entry ids are Redis server timestamps (ms), so when it stopped
        # growing is exact, whatever this driver's own event-loop lag; the ack is polled.
        log = keys.chunk_log(MODEL, rid)
        at_wall = time.time() - (time.monotonic() - at)
        acked = None
        while time.monotonic() < at + 3:
            if not await r.xrange(keys.jobs(MODEL), eid, eid):
                acked = time.monotonic()
                break
            await asyncio.sleep(0.02)
        if acked is None:
            s.violations.append(f"{rid}: not acked 3 s after the hang-up")
            return
        await asyncio.sleep(0.3)
        last = await r.xrevrange(log, "+", "-", count=1)
        stopped = int(last[0][0].split("-")[0]) / 1000 if last else at_wall
        latency = max(0.0, stopped - at_wall)
        if not running:
            # Queued at the hang-up, but a worker took it before the API noticed the hang-up
            # (it polls for one every 0.25 s before the answer starts) and set the cancel key.
            raced.append(latency)
            return
        latencies.append(latency)
        ack_latencies.append(acked - at)
        if latency > 0.5:
            s.slow_cancels.append(
                {
                    "id": rid,
                    "log_stopped_after_s": round(latency, 3),
                    "ack_seen_after_s": round(acked - at, 3),
                    "log_len": await r.xlen(log),
                    "hung_up": "before headers"
                    if out.status == 0
                    else f"after {len(out.content.split())} tokens",
                }
            )

    async def dispatch() -> None:
        while True:
            item = await hang_ups.get()
            if item is None:
                return
            checks.append(asyncio.create_task(follow(*item)))

    outcomes: list[Outcome] = []
    coros = []
    for i in range(n):
        o = Outcome(i, stream=True, max_tokens=50)
        outcomes.append(o)
        kind = rng.random()
        if kind < 0.35:  # leave while queued (or just after it starts, if it starts soon)
            coros.append(("queued", o, rng.uniform(0.05, 1.0)))
        elif kind < 0.75:
            coros.append(("running", o, rng.randint(1, 40)))
        else:
            coros.append(("full", o, None))

    async with _client(stack, timeout=120) as client:
        watcher = asyncio.create_task(watch_stream())
        dispatcher = asyncio.create_task(dispatch())

        def make(kind: str, o: Outcome, arg: float | int | None):
            if kind == "queued":
                return request(client, o, give_up_after=arg, on_hang_up=hang_ups)
            if kind == "running":
                return request(client, o, hang_up_after=arg, on_hang_up=hang_ups)
            return request(client, o)

        await _bounded([make(*c) for c in coros], concurrency=24)
        hang_ups.put_nowait(None)
        await dispatcher
        await asyncio.gather(*checks)
        stop.set()
        await watcher
    s.faults = sum(o.cancelled for o in outcomes)
    settle(outcomes, s)
    try:
        await check_redis(r, stack.prefix, s)
        s.queued_cancels = len(queued)
        for rid in queued:
            if await r.exists(keys.chunk_log(MODEL, rid)) or await r.exists(
                keys.result(MODEL, rid)
            ):
                s.started_after_cancel += 1
                s.violations.append(f"{rid}: cancelled while queued, but it started")
    finally:
        await r.aclose()
    s.p99_cancel_latency_s = p99(latencies)
    s.p99_ack_seen_s = p99(ack_latencies)
    s.queued_then_started = len(raced)
    s.max_queued_then_started_s = max(raced, default=None)
    if raced and max(raced) > 5:
        s.violations.append(f"a job queued at its hang-up ran until {max(raced):.1f}s after it")
    if s.p99_cancel_latency_s is not None and s.p99_cancel_latency_s > 1.0:
        s.violations.append(f"p99 cancel latency {s.p99_cancel_latency_s:.2f}s > 1s")
    s.elapsed_s = time.monotonic() - started
    return s


# ---------------------------------------------------------------------------------------------
# 3. Race: an instant worker, tiny generations; the first chunk must always arrive


async def first_chunk_race(stack: Stack, *, n: int, size: str, seed: int = 3) -> Summary:
    rng = random.Random(seed)
    s = Summary("race", size)
    started = time.monotonic()
    stack.api("--max-queue", str(max(256, n)))
    stack.fake_worker("--fake-token-delay", "0")
    outcomes = [Outcome(i, stream=True, max_tokens=rng.randint(1, 4)) for i in range(n)]
    async with _client(stack, timeout=60) as client:
        await _bounded([request(client, o) for o in outcomes], concurrency=32)
    settle(outcomes, s)
    if s.rejected:
        s.violations.append(f"{s.rejected} requests rejected: the race test must not overload")
    if s.errored:
        s.violations.append(f"{s.errored} requests errored")
    r = _redis(stack)
    try:
        await check_redis(r, stack.prefix, s)
    finally:
        await r.aclose()
    s.elapsed_s = time.monotonic() - started
    return s


# ---------------------------------------------------------------------------------------------
# 9. Overload at 10x capacity


async def overload(stack: Stack, *, n: int, size: str, seed: int = 9) -> Summary:
    """A worker of 4 slots x 20 tokens x 20 ms serves ~10 requests/s; they arrive at ~100/s
    and the API holds at most --max-queue 8 (queued + running)."""
    rng = random.Random(seed)
    s = Summary("overload", size)
    started = time.monotonic()
    stack.api("--max-queue", "8")
    stack.fake_worker("--fake-token-delay", "0.02", "--limit-worker-concurrency", "4")
    outcomes = [Outcome(i, stream=rng.random() < 0.5, max_tokens=20) for i in range(n)]
    lag = asyncio.create_task(_loop_lag(s))
    async with _client(stack, timeout=120) as client:
        tasks = []
        for o in outcomes:
            tasks.append(asyncio.create_task(request(client, o)))
            await asyncio.sleep(0.01)  # open loop: ~100 arrivals a second
        await asyncio.gather(*tasks)
    lag.cancel()
    settle(outcomes, s)
    s.faults = s.rejected
    s.p99_reject_latency_s = p99([o.latency for o in outcomes if o.status == 429])
    t0 = outcomes[0].started
    s.slow_rejects = [
        {"index": o.index, "sent_at_s": round(o.started - t0, 3), "latency_s": round(o.latency, 3)}
        for o in outcomes
        if o.status == 429 and o.latency > 0.1
    ]
    if not s.rejected:
        s.violations.append("no request was refused at 10x capacity")
    # The target is 200 ms. The small run shares a 2-core box with the API, the worker, Redis
    # and other jobs, where this driver itself stalls for 100-300 ms now and then (see
    # driver_max_lag_s), so there it only has to stay under 500 ms.
    limit = 0.2 if size == "full" else 0.5
    if s.p99_reject_latency_s is not None and s.p99_reject_latency_s > limit:
        s.violations.append(
            f"p99 429 latency {s.p99_reject_latency_s * 1000:.0f}ms > {limit * 1000:.0f}ms"
        )
    if s.errored:
        s.violations.append(f"{s.errored} accepted requests errored")
    r = _redis(stack)
    try:
        await check_redis(r, stack.prefix, s)
    finally:
        await r.aclose()
    s.elapsed_s = time.monotonic() - started
    return s


SCENARIOS = {
    "kill": (kill_workers, {"small": 60, "full": 2000}),
    "disconnect": (disconnect_storm, {"small": 80, "full": 2000}),
    "race": (first_chunk_race, {"small": 300, "full": 10000}),
    "overload": (overload, {"small": 200, "full": 2000}),
}
