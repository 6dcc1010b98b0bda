"""`tokenrelay bench`: --prompt-len counts the served model's tokens, and the run checks
the count the server reports."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tokenrelay import runtime
from tokenrelay.bench import run
from tokenrelay.bench.load import Workload, _stream
from tokenrelay.bench.models import SYNTHETIC, prompts_for
from tokenrelay.bench.stats import Record
from tokenrelay.cli import build_parser
from tokenrelay.runtime import ServeInfo
from tokenrelay.workers.prompts import encode_prompt

LENGTHS = [1, 16, 128, 1000]


@pytest.mark.parametrize("length", LENGTHS)
def test_prompts_are_exactly_prompt_len_tokens_of_the_demo_model(
    demo_model: Path, length: int
) -> None:
    """Bug: prompts were synthetic words `w123 ...`, one token each only for the random
    models' tokenizer: `--prompt-len 128` sent SmolLM2 610-768 tokens."""
    _assert_exact(str(demo_model), length)


@pytest.mark.parametrize("length", LENGTHS)
def test_prompts_are_exactly_prompt_len_tokens_of_the_synthetic_tokenizer(length: int) -> None:
    _assert_exact(SYNTHETIC, length)


def _assert_exact(source: str, length: int) -> None:
    tokenizer = prompts_for(source).tokenizer
    workload = Workload(prompt_len=length, tokenizer=source)
    texts = set()
    for salt in (0, 1, 7, 100_003):
        # encoded as the worker encodes a completion's prompt
        assert len(encode_prompt(tokenizer, workload.job("bench", salt))) == length
        assert workload.body("bench", salt) == workload.body("bench", salt)  # deterministic
        texts.add(workload.body("bench", salt)["prompt"])
    assert len(texts) == 4  # each request index its own prompt


def test_mixed_prompts_are_each_requests_own_length() -> None:
    workload = Workload(prompt_len=32, profile="mixed", offset=200_000, tokenizer=SYNTHETIC)
    counted = [prompts_for(SYNTHETIC).count(str(workload.body("m", i)["prompt"])) for i in range(8)]
    assert counted == [workload.lengths(i)[0] for i in range(8)]
    assert len(set(counted)) > 1


async def test_http_records_the_prompt_tokens_the_server_reports() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    events = [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]}, {"usage": usage}]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, text=stream)

    transport = httpx.MockTransport(handler)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        record = Record(start=0.0, prompt_len=8)
        await _stream(http, {"prompt": "x", "stream": True}, record)
    assert (record.prompt_tokens, record.tokens) == (7, 2)
    with pytest.raises(SystemExit, match="1 of 1 requests were not the prompt tokens asked"):
        run._check_prompts([record], "http")


def test_check_passes_equal_counts_and_a_server_that_reports_none() -> None:
    run._check_prompts([Record(start=0.0, prompt_len=8, prompt_tokens=8)], "engine")
    run._check_prompts([Record(start=0.0, prompt_len=8)], "http")  # FastChat: no usage
    failed = Record(start=0.0, prompt_len=8, prompt_tokens=0, error="HTTP 500")
    run._check_prompts([failed], "http")  # counted as an error, not a mismatch


def test_engine_run_passes_the_prompt_token_check(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "--model-path", "random:tiny", "--device", "cpu", "--modes", "engine"]
    argv += ["--concurrency", "1", "--requests-per-client", "1", "--prompt-len", "8"]
    run.run(build_parser().parse_args([*argv, "--output-len", "4", "--out", str(out)]))
    [row] = json.loads(out.read_text())
    assert row["errors"] == 0
    assert row["prompt_tokens"] == 8 * row["requests"]


def test_http_mode_counts_the_tokenizer_flag_else_the_serves_model_else_synthetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = ["bench", "--modes", "http", "--api-url", "http://127.0.0.1:9"]
    assert run._http_target(build_parser().parse_args(base))[2] == SYNTHETIC
    args = build_parser().parse_args([*base, "--tokenizer", "/models/SmolLM2"])
    assert run._http_target(args)[2] == "/models/SmolLM2"
    serve = ServeInfo("redis://r", "http://127.0.0.1:8200/v1", None, "SmolLM2", "/m/SmolLM2")
    monkeypatch.setattr(runtime, "running", lambda: serve)
    args = build_parser().parse_args(["bench", "--modes", "http"])
    assert run._http_target(args) == ("http://127.0.0.1:8200", "SmolLM2", "/m/SmolLM2")
