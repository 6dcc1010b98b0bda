import httpx

from .conftest import DEMO_MODEL
from .stack import Stack


def test_demo_model_answers_paris(model_stack: Stack) -> None:
    r = httpx.post(
        f"{model_stack.url}/v1/chat/completions",
        timeout=60,
        json={
            "model": DEMO_MODEL,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        },
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_fake_worker_round_trip(stack: Stack) -> None:
    stack.api()
    stack.fake_worker()
    r = httpx.post(
        f"{stack.url}/v1/completions",
        timeout=30,
        json={"model": "fake", "prompt": "hi", "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
