"""Start real tokenrelay processes (API, workers) against the test Redis, as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import free_port

LOGS = Path(os.environ.get("TOKENRELAY_TEST_LOGS", "test-artifacts/logs"))


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.wait(30)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Stack:
    """An API and its workers, sharing one Redis and one key prefix."""

    redis_url: str
    prefix: str
    processes: list[Process] = field(default_factory=list)
    api_port: int = 0
    # What the processes get as --redis-url when it differs from the test's own redis_url
    # (a redis+sentinel:// URL: tests/sentinels.py)
    service_url: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def _spawn(self, name: str, *argv: str) -> Process:
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{self.prefix}-{name}-{len(self.processes)}.log"
        out = open(log, "wb")
        popen = subprocess.Popen(
            [
                *tokenrelay_argv(),
                name,
                "--redis-url",
                self.service_url or self.redis_url,
                "--key-prefix",
                self.prefix,
                *argv,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def api(self, *argv: str) -> Process:
        self.api_port = free_port()
        proc = self._spawn("api", "--port", str(self.api_port), *argv)
        self.wait_http("/health", proc)
        return proc

    def worker(self, *argv: str, wait: bool = True) -> Process:
        proc = self._spawn("worker", *argv)
        if wait:
            self.wait_workers(sum(p.name == "worker" and p.alive() for p in self.processes), proc)
        return proc

    def batch_worker(self, *argv: str, wait: bool = True) -> Process:
        """A `tokenrelay batch-worker`, with heartbeats and maintenance quick enough that a
        lost batch comes back within seconds."""
        fast = ("--batch-heartbeat-interval", "1", "--batch-maintenance-interval", "1")
        proc = self._spawn("batch-worker", *fast, *argv)
        if wait:
            self.wait_batch_workers(
                sum(p.name == "batch-worker" and p.alive() for p in self.processes), proc
            )
        return proc

    def wait_batch_workers(self, count: int, proc: Process, timeout: float = 60) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        key = f"rq:workers:{self.prefix}-batches"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.alive(), f"{proc.name} exited:\n{proc.output()}"
            if sum(client.exists(w) for w in client.smembers(key)) >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{count} batch workers not registered:\n{proc.output()}")

    def fake_worker(self, *argv: str, wait: bool = True) -> Process:
        return self.worker("--engine", "fake", "--model-names", "fake", *argv, wait=wait)

    def wait_http(self, path: str, proc: Process, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.alive(), f"{proc.name} exited:\n{proc.output()}"
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not ready:\n{proc.output()}")

    def wait_workers(self, count: int, proc: Process, timeout: float = 120) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.alive(), f"{proc.name} exited:\n{proc.output()}"
            ids = client.smembers(f"{self.prefix}:workers")
            if sum(client.exists(f"{self.prefix}:worker:{i}") for i in ids) >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{count} workers not live:\n{proc.output()}")

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.alive():
                proc.popen.terminate()
        for proc in self.processes:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
