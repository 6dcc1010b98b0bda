"""docker-compose.yml, checked without a Docker engine: against the Compose
Specification's JSON schema, and by running each service's command as a local process
with the environment compose would give it (service hostnames mapped to 127.0.0.1, Redis
from the test session, ports remapped to free ones, the fake engine instead of a model)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from tokenrelay.cli import COMMANDS
from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import EmbeddedRedis, free_port

from .stack import LOGS, Process, Stack

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "compose_spec" / "compose_spec.json"
VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default}, enough for our file."""
    return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = list(jsonschema.Draft201909Validator(schema).iter_errors(compose()))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_layout() -> None:
    doc = compose()
    services = doc["services"]
    assert {"redis", "api", "worker", "worker-cpu", "batch-worker", "ui"} <= set(services)
    assert "--appendonly" in services["redis"]["command"] and "healthcheck" in services["redis"]
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert all(v.endswith(":/models:ro") for v in services["worker"]["volumes"])
    # configuration only from the environment: commands carry no flags
    for name in ("api", "worker", "worker-cpu", "batch-worker", "ui"):
        command = services[name]["command"]
        assert command[0] == "tokenrelay" and len(command) == 2, command
        assert all(k.startswith("TOKENRELAY_") for k in services[name]["environment"])
    assert services["ui"]["environment"]["TOKENRELAY_API_URL"] == "http://api:8000/v1"


class ComposeRun:
    """The compose services as local processes, sharing the test's Redis and key prefix."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.stack = Stack(redis_url, prefix)
        self.ports = {"api": free_port(), "ui": free_port()}
        self.hosts = {
            "redis://redis:6379/0": redis_url,
            "http://api:8000": f"http://127.0.0.1:{self.ports['api']}",
        }

    def env(self, service: dict[str, Any], name: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        env = {**base, "TOKENRELAY_KEY_PREFIX": self.stack.prefix}
        for key, raw in service.get("environment", {}).items():
            value = interpolate(str(raw), {})
            for host, local in self.hosts.items():
                value = value.replace(host, local)
            env[key] = value
        if env.get("TOKENRELAY_HOST") == "0.0.0.0":
            env["TOKENRELAY_HOST"] = "127.0.0.1"
        if name in self.ports:
            env["TOKENRELAY_PORT"] = str(self.ports[name])
        if name.startswith("worker"):
            env["TOKENRELAY_ENGINE"] = "fake"  # no model here: the fake engine, same flags
        return env

    def start(self, name: str, service: dict[str, Any], index: int = 0) -> Process:
        command = [interpolate(c, {}) for c in service["command"]]
        assert command[0] == "tokenrelay"
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"{self.stack.prefix}-compose-{name}-{index}.log"
        popen = subprocess.Popen(
            [*tokenrelay_argv(), *command[1:]],
            env=self.env(service, name),
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        proc = Process(name, popen, log)
        self.stack.processes.append(proc)
        return proc


@pytest.fixture
def compose_run(redis_server: EmbeddedRedis, prefix: str) -> Iterator[ComposeRun]:
    run = ComposeRun(redis_server.url, prefix)
    yield run
    run.stack.stop()


def test_compose_services_answer_a_chat_request(compose_run: ComposeRun) -> None:
    services = compose()["services"]
    stack = compose_run.stack
    api = compose_run.start("api", services["api"])
    stack.api_port = compose_run.ports["api"]
    stack.wait_http("/health", api)
    for i in range(3):  # docker compose up --scale worker=3
        compose_run.start("worker", services["worker"], i)
    compose_run.start("worker-cpu", services["worker-cpu"])
    # docker compose up --scale batch-worker=2
    batch_workers = [compose_run.start("batch-worker", services["batch-worker"], i) for i in (0, 1)]
    stack.wait_workers(4, api)

    model = interpolate(services["worker"]["environment"]["TOKENRELAY_MODEL_NAMES"], {})
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]

    status = httpx.get(f"{stack.url}/v1/status", timeout=10).json()
    (served,) = status["models"]
    assert served["name"] == model and served["workers"] == 4
    devices = sorted(w["device"] for w in status["workers"])
    assert devices == ["cpu", "cuda", "cuda", "cuda"]
    # the compose environment's log format reached every process
    assert api.output().lstrip().startswith("{")
    _check_api_healthcheck(services["api"], compose_run.ports["api"])
    _check_batch_workers(compose_run, batch_workers, model)
    if "ui" in COMMANDS:
        _check_ui(compose_run, services["ui"])


def _check_api_healthcheck(api: dict[str, Any], port: int) -> None:
    test = [c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in api["healthcheck"]["test"]]
    assert test[0] == "CMD" and test[1] == "python"
    subprocess.run([sys.executable, *test[2:]], check=True, timeout=30)


def _check_batch_workers(run: ComposeRun, workers: list[Process], model: str) -> None:
    """Both batch workers register with RQ, and a batch runs to completed."""
    import openai

    from .batch_files import chat_line, start, wait_for

    run.stack.wait_batch_workers(2, workers[0])
    client = openai.OpenAI(base_url=f"{run.stack.url}/v1", api_key="EMPTY", max_retries=0)
    lines = [chat_line(f"c{i}", model, "hi", max_tokens=2) for i in range(4)]
    batch = wait_for(client, start(client, lines).id, timeout=30)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 4


def _check_ui(run: ComposeRun, ui: dict[str, Any]) -> None:
    proc = run.start("ui", ui)
    port = run.ports["ui"]
    deadline_s = 120
    import time

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.alive(), proc.output()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the ui service did not answer:\n{proc.output()}")
