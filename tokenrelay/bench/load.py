"""Drive N concurrent streams, either into an engine in-process or through the public API."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, replace

import httpx

from tokenrelay.queueing.messages import Job, SamplingParams
from tokenrelay.workers.engine import Engine

from .models import SYNTHETIC, prompts_for
from .stats import Record


@dataclass
class Workload:
    prompt_len: int = 128
    output_len: int = 256
    profile: str = "fixed"  # fixed | mixed
    temperature: float = 0.0
    offset: int = 0  # added to request indices, so parallel clients send different prompts
    tokenizer: str = SYNTHETIC  # whose tokens prompt_len counts: the served model's path

    def lengths(self, index: int) -> tuple[int, int]:
        """Request ``index``'s prompt and output lengths, in tokens."""
        if self.profile == "fixed":
            return self.prompt_len, self.output_len
        rng = random.Random(index + self.offset)  # the same mix every run
        return rng.randint(16, 2 * self.prompt_len), rng.randint(16, 2 * self.output_len)

    def body(self, model: str, index: int) -> dict[str, object]:
        prompt_len, output_len = self.lengths(index)
        index += self.offset
        return {
            "model": model,
            "prompt": prompts_for(self.tokenizer).text(prompt_len, index),
            "max_tokens": output_len,
            "temperature": self.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    def job(self, model: str, index: int) -> Job:
        body = self.body(model, index)
        return Job(
            id=f"bench-{index}-{time.monotonic_ns()}",
            model=model,
            kind="completion",
            prompt=str(body["prompt"]),
            params=SamplingParams(
                temperature=self.temperature,
                max_tokens=int(body["max_tokens"]),  # type: ignore[call-overload]
                ignore_eos=True,
            ),
            stream=True,
            created=int(time.time()),
            deadline=time.time() + 3600,
        )


async def _clients(concurrency: int, requests: int, one) -> list[Record]:  # type: ignore[no-untyped-def]
    """``concurrency`` clients share ``requests`` requests, each sent when a client is free."""
    counter = iter(range(requests))
    records: list[Record] = []

    async def client() -> None:
        for index in counter:
            records.append(await one(index))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


async def run_engine(
    engine: Engine, workload: Workload, concurrency: int, requests: int
) -> list[Record]:
    jobs = [workload.job("bench", index) for index in range(requests)]  # before the clock

    async def one(index: int) -> Record:
        job = jobs[index]
        record = Record(start=time.perf_counter(), prompt_len=workload.lengths(index)[0])
        last = record.start
        try:
            async for events in engine.submit(job).stream():
                now = time.perf_counter()
                if any(d.text for e in events for d in e.deltas):
                    if record.first is None:
                        record.first = now
                    else:
                        record.gaps.append(now - last)
                    last = now
                record.tokens = events[-1].completion_tokens
                record.prompt_tokens = events[-1].prompt_tokens
        except Exception as exc:
            record.error = repr(exc)
        record.end = time.perf_counter()
        return record

    return await _clients(concurrency, requests, one)


async def run_http(
    base_url: str,
    model: str,
    workload: Workload,
    concurrency: int,
    requests: int,
    api_key: str = "EMPTY",
    barrier: object | None = None,
) -> list[Record]:
    # Every prompt is built before the clock starts, and with several processes they all
    # start together: a tokenizer loaded (about a second for a 128k vocabulary) or a
    # prompt built inside the measured window would count as serving time.
    bodies = [workload.body(model, index) for index in range(requests)]
    if barrier is not None:
        barrier.wait()  # type: ignore[attr-defined]
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=base_url, timeout=3600, limits=limits, headers=headers
    ) as http:

        async def one(index: int) -> Record:
            body = bodies[index]
            record = Record(start=time.perf_counter(), prompt_len=workload.lengths(index)[0])
            try:
                await _stream(http, body, record)
            except Exception as exc:
                record.error = repr(exc)
            record.end = time.perf_counter()
            return record

        return await _clients(concurrency, requests, one)


def run_http_procs(
    base_url: str, model: str, workload: Workload, concurrency: int, requests: int, procs: int
) -> list[Record]:
    """The HTTP load from several processes, so the client is never what limits."""
    import concurrent.futures
    import multiprocessing

    procs = max(1, min(procs, concurrency))
    shares = [
        (
            concurrency // procs + (i < concurrency % procs),
            requests // procs + (i < requests % procs),
        )
        for i in range(procs)
    ]
    if procs == 1:
        return asyncio.run(run_http(base_url, model, workload, concurrency, requests))
    ctx = multiprocessing.get_context("spawn")
    with (
        ctx.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool,
    ):
        barrier = manager.Barrier(procs)
        futures = [
            pool.submit(_http_share, base_url, model, workload, c, r, i, barrier)
            for i, (c, r) in enumerate(shares)
        ]
        return [record for f in futures for record in f.result()]


def _http_share(
    base_url: str,
    model: str,
    workload: Workload,
    concurrency: int,
    requests: int,
    index: int,
    barrier: object,
) -> list[Record]:
    # each share sends different prompts (salted by its index)
    shifted = replace(workload, offset=index * 100_000)
    return asyncio.run(run_http(base_url, model, shifted, concurrency, requests, barrier=barrier))


async def _stream(http: httpx.AsyncClient, body: dict[str, object], record: Record) -> None:
    last = record.start
    usage_seen = False
    events = 0  # content events, the token count where a server sends no usage
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                record.error = str(event["error"])
                return
            now = time.perf_counter()
            if event.get("usage"):
                usage_seen = True
                record.tokens = event["usage"]["completion_tokens"]
                record.prompt_tokens = event["usage"].get("prompt_tokens")
            if any(c.get("text") for c in event.get("choices", [])):
                events += 1
                if record.first is None:
                    record.first = now
                else:
                    record.gaps.append(now - last)
                last = now
    if not usage_seen:
        # e.g. FastChat sends no usage in streams (and ignores stream_options):
        # count one token per content event (FastChat: run with --stream-interval 1)
        record.tokens = events
