"""Direct chat in a real browser: streaming, Stop, readable errors, the real model."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest
import redis
from playwright.sync_api import expect

from tokenrelay.queueing.keys import Keys

from ..conftest import DEMO_MODEL
from .conftest import Page, start_ui


def open_chat(page: Page, url: str, model: str | None = "fake") -> None:
    """Open the page and wait until the model list is loaded (asking before it is filled
    gets "No model picked")."""
    page.page.goto(url)
    page.page.locator("#chat-input textarea").wait_for()
    if model:
        expect(page.page.locator("#chat-model input")).to_have_value(model)


def pick_model(page: Page, name: str) -> None:
    page.page.locator("#chat-model input").click()
    page.page.get_by_role("option", name=name).click()


def ask(page: Page, text: str) -> None:
    box = page.page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def chat_text(page: Page) -> str:
    return page.page.locator("#chat-log").inner_text()


def wait_text(page: Page, needle: str, timeout: float = 60) -> None:
    page.page.locator("#chat-log").get_by_text(needle).first.wait_for(timeout=timeout * 1000)


def test_real_model_answers_paris(model_stack, page: Page) -> None:
    url = start_ui(model_stack)
    open_chat(page, url, DEMO_MODEL)
    pick_model(page, DEMO_MODEL)
    page.page.locator("#chat-params").click()  # open the parameters: greedy, for a sure answer
    temperature = page.page.locator("#chat-temperature input[type=number]")
    temperature.fill("0")
    temperature.press("Tab")
    expect(page.page.locator("#chat-temperature input[type=range]")).to_have_value("0")
    ask(page, "What is the capital of France?")
    wait_text(page, "Paris", timeout=120)
    wait_text(page, "tokens/s", timeout=120)  # the footer comes with the usage chunk
    page.shot("chat-paris")
    assert "prompt" in chat_text(page)
    assert page.outside_hosts() == set()


def worker_inflight(client: redis.Redis, prefix: str) -> int:
    ids = client.smembers(f"{prefix}:workers")
    infos = [client.get(f"{prefix}:worker:{i}") for i in ids]
    return sum(json.loads(info)["inflight"] for info in infos if info)


def chunk_log_lengths(client: redis.Redis, prefix: str) -> list[int]:
    keys = sorted(client.scan_iter(f"{prefix}:{{m:fake}}:log:*"))
    return [client.xlen(k) for k in keys]


def cancelled_jobs(client: redis.Redis, prefix: str) -> list[str]:
    return list(client.scan_iter(Keys(prefix).cancel("fake", "*")))


def test_stop_cancels_the_job_on_the_worker(stack, page: Page, sync_redis) -> None:
    # A resume grace of 30 s: a hang-up alone would leave the job running that long; Stop
    # cancels it at once (POST .../cancel), so the job ends well before the grace.
    stack.api("--resume-grace", "30")
    stack.fake_worker("--fake-token-delay", "0.05")
    open_chat(page, start_ui(stack))
    ask(page, "tell me a very long story")
    wait_text(page, "t20.")  # 20 tokens in: the job is running on the worker
    assert worker_inflight(sync_redis, stack.prefix) == 1
    assert not cancelled_jobs(sync_redis, stack.prefix)
    page.page.locator("#chat-stop").click()
    stopped = time.monotonic()  # 20 s: a hang guard, and still well before the grace
    while worker_inflight(sync_redis, stack.prefix) and time.monotonic() - stopped < 20:
        time.sleep(0.1)
    assert worker_inflight(sync_redis, stack.prefix) == 0, "the worker kept generating"
    assert len(cancelled_jobs(sync_redis, stack.prefix)) == 1, "Stop did not cancel the job"
    before, shown = chunk_log_lengths(sync_redis, stack.prefix), chat_text(page)
    time.sleep(1.5)
    assert chunk_log_lengths(sync_redis, stack.prefix) == before
    assert chat_text(page) == shown
    assert "t500." not in shown  # stopped long before max tokens (512 at 0.05 s each)
    page.shot("chat-stopped")


def test_bad_key_is_a_readable_message(stack, page: Page) -> None:
    stack.api("--api-keys", "right-key")
    stack.fake_worker()
    open_chat(page, start_ui(stack, api_key="wrong-key"), model=None)
    notice = page.page.locator("#chat-notice")
    notice.get_by_text("The API key was refused").wait_for()
    assert "401" in notice.inner_text()
    page.shot("chat-bad-key")


def test_no_worker_is_a_readable_503(stack, page: Page) -> None:
    stack.api()
    worker = stack.fake_worker()
    open_chat(page, start_ui(stack))
    pick_model(page, "fake")
    worker.kill(signal.SIGTERM)  # deregisters at once: the model is known, no worker is live
    ask(page, "hello")
    wait_text(page, "No model is ready")
    text = chat_text(page)
    assert "503" in text and "Start a worker" in text
    assert "network error" not in text.lower()
    page.shot("chat-no-worker")


@pytest.mark.parametrize("root_path", ["/chat"])
def test_works_under_a_root_path(stack, page: Page, root_path: str) -> None:
    stack.api()
    stack.fake_worker()
    url = start_ui(stack, root_path=root_path)
    assert url.endswith("/chat/")
    root = httpx.get(url.removesuffix("chat/"), follow_redirects=True, timeout=10)
    assert root.status_code == 200 and str(root.url) == url
    open_chat(page, url)
    ask(page, "hello")
    wait_text(page, "tokens/s")
    assert "t3." in chat_text(page)
    rows = page.page.locator("#chat-log .message-row")
    expect(rows).to_have_count(2)
    first = rows.nth(1).inner_text()
    page.page.locator("#chat-regenerate").click()  # asked again (new job id), not added
    expect(rows.nth(1)).not_to_have_text(first)
    wait_text(page, "tokens/s")
    expect(rows).to_have_count(2)
    page.page.locator("#chat-clear").click()
    expect(rows).to_have_count(0)
    assert page.outside_hosts() == set()


def test_full_queue_is_a_readable_429(stack, page: Page) -> None:
    stack.api("--max-queue", "1")
    stack.fake_worker("--fake-token-delay", "0.5", "--limit-worker-concurrency", "1")
    open_chat(page, start_ui(stack))
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=60) as held:
        # Keep the line iterator referenced: a throwaway one is freed at once, and closing it
        # closes the response, which the API (rightly) takes for a hang-up and cancels the job
        # that was meant to hold the queue full.
        lines = held.iter_lines()
        assert next(lines).startswith("id: ")  # event 0 (id line first): the queue is full
        ask(page, "hello")
        wait_text(page, "The server is overloaded")
    text = chat_text(page)
    assert "429" in text and "full" in text and "Wait a moment" in text
    page.shot("chat-overloaded")
