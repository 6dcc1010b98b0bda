"""Batch input files and waiting on batches, shared by the Batch API tests."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
from openai.types import Batch

ENDED = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, model: str, content: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], **body},
    }


def completion_line(custom_id: str, model: str, prompt: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": model, "prompt": prompt, **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def start(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions") -> Batch:
    """Upload ``lines`` as a batch file and create a batch of it."""
    upload = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
    )


def wait_for(
    client: openai.OpenAI,
    batch_id: str,
    until: Any = lambda b: b.status in ENDED,
    timeout: float = 60,
) -> Batch:
    """Poll ``retrieve`` until ``until(batch)``."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch never got there: {batch}"
        time.sleep(0.1)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).read().decode()
    return [json.loads(x) for x in text.splitlines()]
