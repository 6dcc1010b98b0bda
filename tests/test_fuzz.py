"""Fuzz the API against its own OpenAPI schema (schemathesis): it never answers 5xx, and
every error is in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.

Bounded for CI: 30 examples per operation, no per-example deadline (the box is shared).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from .stack import Stack

CALLS: dict[str, int] = {}


def _check(case: schemathesis.Case) -> None:
    response = case.call(timeout=30)
    CALLS[case.operation.label] = CALLS.get(case.operation.label, 0) + 1
    where = f"{case.method} {case.formatted_path} {case.body!r:.300}"
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, (where, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}, (where, body)
        assert isinstance(body["error"]["message"], str), (where, body)
        assert body["error"]["code"] is None or isinstance(body["error"]["code"], str), body


def test_api_never_500s_and_errors_are_openai_shaped(stack: Stack) -> None:
    stack.api("--max-queue", "1000")
    stack.fake_worker("--limit-worker-concurrency", "16")
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 4
    for operation in operations:
        fuzz = settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(case=operation.as_strategy())(_check))
        fuzz()
    assert CALLS.get("POST /v1/chat/completions", 0) >= 20, CALLS
    assert CALLS.get("POST /v1/completions", 0) >= 20, CALLS
