"""GET /metrics after real requests, parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .stack import Stack

HANG_GUARD_S = 60.0  # only against a hang: nothing below asserts the machine's speed


def _scrape(stack: Stack) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of every sample /metrics exposes."""
    r = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[name][tuple(sorted(labels.items()))]


def _complete(stack: Stack, stream: bool, max_tokens: int = 6, **extra: object) -> None:
    body = {"model": "fake", "prompt": "hi", "max_tokens": max_tokens, "stream": stream, **extra}
    r = httpx.post(f"{stack.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text


def test_metrics_after_requests(stack: Stack) -> None:
    stack.api()
    stack.fake_worker("--fake-token-delay", "0.01")
    _complete(stack, stream=False)
    _complete(stack, stream=True)
    bad = httpx.post(f"{stack.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 404
    s = _scrape(stack)

    assert _value(s, "tokenrelay:generation_tokens_total", model="fake") == 12
    assert _value(s, "tokenrelay:prompt_tokens_total", model="fake") > 0
    assert _value(s, "tokenrelay:request_success_total", model="fake") == 2
    assert _value(s, "tokenrelay:request_errors_total", type="model_not_found") == 1
    for hist in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        name = f"tokenrelay:{hist}_seconds"
        assert _value(s, f"{name}_count", model="fake") == 2
        assert 0 < _value(s, f"{name}_sum", model="fake") < 30
        assert _value(s, f"{name}_bucket", model="fake", le="+Inf") == 2
    # gauges from Redis at scrape time
    assert _value(s, "tokenrelay:workers", model="fake") == 1
    assert _value(s, "tokenrelay:num_requests_running", model="fake") == 0
    assert _value(s, "tokenrelay:num_requests_waiting", model="fake") == 0
    assert _value(s, "tokenrelay:queue_lag_seconds", model="fake") == 0
    assert _value(s, "tokenrelay:dead_letters", model="fake") == 0
    assert _value(s, "tokenrelay:redis_up") == 1


async def test_metrics_count_waiting_and_running(stack: Stack) -> None:
    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "1", "--fake-token-delay", "0.1")
    # 120 s of tokens each: the one running holds the only slot past the hang guard, so
    # "2 waiting" lasts until we hang up, not for a window the scrape has to catch.
    body = {"model": "fake", "prompt": "hi", "max_tokens": 1200, "stream": True}
    async with httpx.AsyncClient(base_url=stack.url, timeout=HANG_GUARD_S) as client:
        request = client.build_request("POST", "/v1/completions", json=body)
        tasks = [asyncio.create_task(client.send(request, stream=True)) for _ in range(3)]
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while True:
                seen = await asyncio.to_thread(_scrape, stack)
                if _value(seen, "tokenrelay:num_requests_waiting", model="fake") == 2:
                    break
                assert time.monotonic() < deadline, "never saw 2 waiting"
                await asyncio.sleep(0.05)
        finally:  # hang up: the running job and the queued ones are cancelled
            for task in tasks:
                task.cancel()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, httpx.Response):
                    await r.aclose()
    assert _value(seen, "tokenrelay:num_requests_running", model="fake") == 1
    assert _value(seen, "tokenrelay:queue_lag_seconds", model="fake") > 0


def test_metrics_are_open_when_keys_are_set(stack: Stack) -> None:
    stack.api("--api-keys", "k1")
    r = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert r.status_code == 200 and "tokenrelay:redis_up 1.0" in r.text
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    s = _scrape(stack)
    assert _value(s, "tokenrelay:request_errors_total", type="invalid_api_key") == 1
