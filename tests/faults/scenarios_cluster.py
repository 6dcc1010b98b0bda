"""Scenario 14: a Redis Cluster primary SIGKILLed under load (issue 14).

A 3-primary + 3-replica cluster (tests/clusters.py); three models whose ``{m:NAME}`` slots
lie on three different shards, one fake worker each; the API and the workers are given the
``redis+cluster://`` URL. Requests go to the three models in turn, a bounded number at a
time; once about half are answered, the primary serving the first model's slot is killed and
its replica takes over. The books, as in every scenario (tests/faults/ledger.py): every
accepted request is answered with its exact text or ends with an error a client can retry,
none waits out its deadline (accepted, then silently lost); no request the other two shards'
models accepted fails (they may refuse some with 503 + Retry-After while the registry keys on
the failed shard are out: ARCHITECTURE.md, Redis Cluster); a new request to the failed
shard's model is served again once the replica has taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter

import httpx
import redis
from redis.cluster import ClusterNode, RedisCluster

from tokenrelay.queueing.keys import GROUP, Keys

from ..clusters import ClusterNodes, models_on_distinct_shards
from ..stack import Stack
from .client import _read_stream, bounded, http_client
from .ledger import Outcome, Summary, settle

CONCURRENCY = 96  # requests in flight at once: the failover meets a steady load
BACK_GUARD_S = 30.0
CONCURRENT = ("--limit-worker-concurrency", "32")


class ClusterStack(Stack):
    """A stack whose processes get the ``redis+cluster://`` URL; the test's own reads go
    through a cluster client too."""

    def __init__(self, cluster: ClusterNodes, prefix: str, *, url: str = "") -> None:
        super().__init__(cluster.seed_url, prefix, service_url=url or cluster.url)
        self.cluster = cluster

    def client(self) -> RedisCluster:
        nodes = [ClusterNode("127.0.0.1", p) for p in self.cluster.live_ports()]
        return RedisCluster(startup_nodes=nodes, decode_responses=True, socket_timeout=5)

    def wait_workers(self, count: int, proc, timeout: float = 120) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert proc.alive(), f"{proc.name} exited:\n{proc.output()}"
                ids = client.smembers(f"{self.prefix}:workers")
                if sum(client.exists(f"{self.prefix}:worker:{i}") for i in ids) >= count:
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"{count} workers not live:\n{proc.output()}")


def cluster_stack(cluster: ClusterNodes, prefix: str, models: list[str], **worker) -> ClusterStack:
    """An API and one fake worker per model on ``cluster``."""
    own = ClusterStack(cluster, prefix)
    own.api("--request-timeout", "120", "--max-queue", "5000")
    flags = ("--fake-token-delay", "0.01", "--heartbeat-interval", "0.5")
    for model in models:
        own.worker(
            "--engine", "fake", "--model-names", model, *flags, "--limit-worker-concurrency", "32"
        )
    return own


async def cluster_failover(stack: Stack, *, n: int, size: str, seed: int = 13) -> Summary:
    s = Summary("cluster_failover", size)
    started = time.monotonic()
    cluster = ClusterNodes().start()
    own: ClusterStack | None = None
    try:
        models = models_on_distinct_shards(cluster, stack.prefix)
        own = cluster_stack(cluster, stack.prefix, models)
        await _run(own, models, n, s, random.Random(seed))
        s.elapsed_s = time.monotonic() - started
    finally:
        if own is not None:
            own.stop()
        cluster.stop()
    return s


async def _run(
    own: ClusterStack, models: list[str], n: int, s: Summary, rng: random.Random
) -> None:
    outcomes = [
        Outcome(i, stream=rng.random() < 0.6, max_tokens=rng.randint(8, 30)) for i in range(n)
    ]
    model_of = {o.index: models[o.index % len(models)] for o in outcomes}
    victim = own.cluster.primary_of(Keys(own.prefix).jobs(models[0]))
    s.notes["shards"] = {m: own.cluster.primary_of(Keys(own.prefix).jobs(m)) for m in models}
    async with http_client(own, timeout=180) as client:
        load = asyncio.ensure_future(
            bounded([send(client, o, model_of[o.index]) for o in outcomes], CONCURRENCY)
        )
        while sum(o.finished > 0 for o in outcomes) < n // 2 and not load.done():
            await asyncio.sleep(0.05)
        own.cluster.kill(victim)
        killed = time.monotonic()
        s.faults += 1
        s.notes["killed_at_answered"] = sum(o.finished > 0 for o in outcomes)
        key = Keys(own.prefix).jobs(models[0])
        s.notes["failover_s"] = round(
            await asyncio.to_thread(own.cluster.wait_failover, victim, key), 1
        )
        back = await _served_again(client, models[0], killed)
        s.notes["back_after_s"] = None if back is None else round(back, 1)
        await load
    settle(outcomes, s)
    _judge(own, models, outcomes, model_of, s, back)


async def cluster_reshard(stack: Stack, *, n: int, size: str, seed: int = 3) -> Summary:
    """The first model's slot migrated (keys, job stream and consumer group) to the second
    model's primary once a third of the requests were answered: every accepted request is
    answered with its exact text."""
    s = Summary("cluster_reshard", size)
    started = time.monotonic()
    cluster = ClusterNodes().start()
    own: ClusterStack | None = None
    try:
        models = models_on_distinct_shards(cluster, stack.prefix)
        own = cluster_stack(cluster, stack.prefix, models)
        rng = random.Random(seed)
        outcomes = [
            Outcome(i, stream=rng.random() < 0.6, max_tokens=rng.randint(8, 30)) for i in range(n)
        ]
        model_of = {o.index: models[o.index % len(models)] for o in outcomes}
        keys = Keys(stack.prefix)
        async with http_client(own, timeout=180) as client:
            load = asyncio.ensure_future(
                bounded([send(client, o, model_of[o.index]) for o in outcomes], CONCURRENCY)
            )
            while sum(o.finished > 0 for o in outcomes) < n // 3 and not load.done():
                await asyncio.sleep(0.05)
            to = cluster.primary_of(keys.jobs(models[1]))
            s.notes["keys_moved"] = await asyncio.to_thread(
                cluster.move_slot, keys.jobs(models[0]), to
            )
            s.faults += 1
            await load
        settle(outcomes, s)
        lost = [o for o in outcomes if o.error and o.error.get("code") == "deadline_exceeded"]
        s.lost += len(lost)
        s.violations += [f"request {o.index}: accepted, then lost (deadline)" for o in lost]
        s.notes["errors"] = dict(Counter(_error(o, model_of) for o in outcomes if o.error))
        _check_drained(own, models, s)
        s.elapsed_s = time.monotonic() - started
    finally:
        if own is not None:
            own.stop()
        cluster.stop()
    return s


async def send(client: httpx.AsyncClient, out: Outcome, model: str) -> None:
    """One request to ``model`` as a client sees it (tests/faults/client.py's, for any
    model)."""
    out.started = time.monotonic()
    prompt = f"req-{out.index}"
    if out.stream:
        path = "/v1/chat/completions"
        body: dict = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body |= {"model": model, "max_tokens": out.max_tokens}
    try:
        async with client.stream("POST", path, json=body) as r:
            out.status, out.retry_after = r.status_code, r.headers.get("retry-after")
            if r.status_code != 200:
                out.error = json.loads(await r.aread()).get("error")
            elif out.stream:
                await _read_stream(r, out, None)
            else:
                data = json.loads(await r.aread())
                out.id = data["id"]
                out.ids.add(data["id"])
                out.content = data["choices"][0]["text"]
    except Exception as exc:  # a transport error: the ledger counts it as lost
        out.exception = f"{type(exc).__name__}: {exc}"
    finally:
        out.finished = time.monotonic()


async def _served_again(client: httpx.AsyncClient, model: str, killed: float) -> float | None:
    """Seconds from the kill until a short request to ``model`` is answered."""
    body = {"model": model, "prompt": "probe", "max_tokens": 2}
    while time.monotonic() - killed < BACK_GUARD_S * 2:
        with contextlib.suppress(httpx.HTTPError):
            if (await client.post("/v1/completions", json=body)).status_code == 200:
                return time.monotonic() - killed
        await asyncio.sleep(0.2)
    return None


def _judge(
    own: ClusterStack,
    models: list[str],
    outcomes: list[Outcome],
    model_of: dict[int, str],
    s: Summary,
    back: float | None,
) -> None:
    lost = [o for o in outcomes if o.error and o.error.get("code") == "deadline_exceeded"]
    for o in lost:
        s.violations.append(f"request {o.index} ({o.id}): accepted, then lost (deadline)")
    s.lost += len(lost)
    s.notes["errors"] = dict(Counter(_error(o, model_of) for o in outcomes if o.error))
    s.notes["answered_by_model"] = dict(
        Counter(model_of[o.index] for o in outcomes if o.status == 200 and not o.error)
    )
    for model in models[1:]:  # the shards not killed: every accepted request answered
        mine = [o for o in outcomes if model_of[o.index] == model]
        failed = [o for o in mine if o.exception or (o.status == 200 and o.error)]
        if failed:
            s.violations.append(f"{model} (a shard not killed): {len(failed)} failed requests")
        s.notes[f"refused_{model}"] = sum(o.status in (429, 503) for o in mine)
    if back is None or back > BACK_GUARD_S:
        s.violations.append(f"{models[0]} not served again within {BACK_GUARD_S:.0f} s")
    _check_drained(own, models, s)


def _error(o: Outcome, model_of: dict[int, str]) -> str:
    error = o.error or {}
    return f"{model_of[o.index]} {o.status} {error.get('code')}: {error.get('message', '')[:90]}"


def _check_drained(own: ClusterStack, models: list[str], s: Summary, timeout: float = 60) -> None:
    """Every model's job stream empty and nothing pending, on whichever node holds it now."""
    keys, client = Keys(own.prefix), own.client()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = {}
            for model in models:
                with contextlib.suppress(redis.ResponseError):
                    xlen = client.xlen(keys.jobs(model))
                    pending = client.xpending(keys.jobs(model), GROUP)["pending"]
                    if xlen or pending:
                        left[model] = (xlen, pending)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        client.close()
    if left:
        s.violations.append(f"job streams not drained (XLEN, pending): {left}")
