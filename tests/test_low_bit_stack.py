"""Every --low-bit format a CPU has, through the whole stack with the real SmolLM2 model:
one worker a format (the asym_int4 one loads the demo's Q4_1 GGUF file itself; sym_int8's
runs the paged engine, the others the batch engine), each
answering the capital of France, and each worker's format in /v1/models and the log."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.stack import Stack
from tokenrelay.demo_model import demo_gguf_path
from tokenrelay.embedded_redis import EmbeddedRedis

FORMATS = ("sym_int4", "asym_int4", "sym_int8", "bf16", "fp16")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Five model workers load at once (the first test's setup): on a busy 2-core machine beside
# another xdist worker that took over the default 300 s, so a longer hang guard
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def low_bit_stack(redis_server: EmbeddedRedis, demo_model: Path) -> Iterator[Stack]:
    # A prefix of its own: the log files are named by prefix, and a second run on the same
    # checkout would write over these workers' logs, which the test reads
    s = Stack(redis_server.url, f"lowbit{uuid.uuid4().hex[:8]}")
    try:  # a worker that never comes up must not leave the other four running
        s.api()
        for fmt in FORMATS:
            path = demo_gguf_path() if fmt == "asym_int4" else demo_model
            # auto picks the batch engine on a CPU; sym_int8 takes the paged one, so both
            # engines run quantized Linears
            engine = ["--engine", "paged"] if fmt == "sym_int8" else []
            s.worker(
                "--model-path", str(path), "--model-names", f"smol-{fmt}", "--low-bit", fmt,
                "--limit-worker-concurrency", "2", *engine, wait=False,
            )  # fmt: skip
        workers = [p for p in s.processes if p.name == "worker"]
        s.wait_workers(len(FORMATS), workers[-1], timeout=540)
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_answers_paris_and_says_what_it_is(fmt: str, low_bit_stack: Stack) -> None:
    name = f"smol-{fmt}"
    reply = httpx.post(
        f"{low_bit_stack.url}/v1/chat/completions",
        json={"model": name, "messages": QUESTION, "temperature": 0, "max_tokens": 16},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]
    model = httpx.get(f"{low_bit_stack.url}/v1/models/{name}", timeout=10).json()
    want = {"bf16": "bfloat16", "fp16": "float16"}.get(fmt, fmt)
    assert model["weights"] == [want]
    log = next(
        p for p in low_bit_stack.processes if f"smol-{fmt}" in " ".join(p.popen.args)
    ).output()
    if fmt in ("bf16", "fp16"):
        return
    found = re.search(rf"--low-bit {fmt} .*weights ([\d.]+) MiB -> ([\d.]+) MiB", log)
    assert found, log
    assert float(found[2]) < 0.3 * float(found[1])
    if fmt == "asym_int4":
        assert "Q4_1" in log and "exact" in log  # the GGUF's grid, kept
