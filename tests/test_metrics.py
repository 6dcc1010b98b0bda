"""GET /metrics after real requests, parsed with prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .stack import Stack


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


def test_metrics_count_waiting_and_running(stack: Stack) -> None:
    import concurrent.futures as cf
    import time

    stack.api()
    stack.fake_worker("--limit-worker-concurrency", "1", "--fake-token-delay", "0.1")
    with cf.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_complete, stack, False, 20) for _ in range(3)]
        deadline = time.monotonic() + 20
        seen = None
        while time.monotonic() < deadline:
            s = _scrape(stack)
            if _value(s, "tokenrelay:num_requests_waiting", model="fake") == 2:
                seen = s
                break
            time.sleep(0.05)
        for f in futures:
            f.result()
    assert seen is not None, "never saw 2 waiting"
    assert _value(seen, "tokenrelay:num_requests_running", model="fake") == 1
    assert _value(seen, "tokenrelay:queue_lag_seconds", model="fake") > 0


def test_metrics_are_open_when_keys_are_set(stack: Stack) -> None:
    stack.api("--api-keys", "k1")
    r = httpx.get(f"{stack.url}/metrics", timeout=10)
    assert r.status_code == 200 and "tokenrelay:redis_up 1.0" in r.text
    assert httpx.get(f"{stack.url}/v1/models").status_code == 401
    s = _scrape(stack)
    assert _value(s, "tokenrelay:request_errors_total", type="invalid_api_key") == 1
