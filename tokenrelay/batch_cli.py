"""`tokenrelay batch run INPUT.jsonl -o OUTPUT.jsonl`: a batch file run start to finish, as
vLLM's `run-batch` does, but through the public HTTP API of a running service: upload the
file, create the batch, poll it with a progress bar, download the results.

OUTPUT holds one line per input line, in input order: the answers and the failed lines
alike (each with ``response`` or ``error``), as vLLM writes them. Without ``--api-url`` it
uses the `tokenrelay serve` running here (see runtime.py). Ctrl-C cancels the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from . import runtime

ENDED = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Optional for argparse (a flag's variable may give them; see envflags.py), required
    # by run().
    parser.add_argument("action", nargs="?", choices=["run"], help="run: run INPUT as one batch")
    parser.add_argument(
        "input", nargs="?", metavar="INPUT.jsonl", help="the batch file (OpenAI's format)"
    )
    parser.add_argument("-o", "--output", metavar="OUTPUT.jsonl", help="where results go")
    parser.add_argument(
        "--api-url",
        help="the API's base URL (default: that of the `tokenrelay serve` running here, else "
        f"{runtime.DEFAULT_API_URL})",
    )
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument(
        "--poll-interval", type=float, default=1.0, help="seconds between progress checks"
    )


def run(args: argparse.Namespace) -> None:
    if args.action != "run" or not args.input or not args.output:
        raise SystemExit("usage: tokenrelay batch run INPUT.jsonl -o OUTPUT.jsonl [--api-url URL]")
    try:
        data = Path(args.input).read_bytes()
    except OSError as exc:
        raise SystemExit(f"tokenrelay batch: cannot read {args.input}: {exc}") from exc
    endpoint = _endpoint(data, args.input)
    api = runtime.api_url(args.api_url).rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"}
    with httpx.Client(base_url=api, headers=headers, timeout=60) as client:
        upload = _ok(
            client.post(
                "/files",
                files={"file": (Path(args.input).name, data)},
                data={"purpose": "batch"},
            )
        )
        batch = _ok(
            client.post(
                "/batches",
                json={
                    "input_file_id": upload["id"],
                    "endpoint": endpoint,
                    "completion_window": "24h",
                },
            )
        )
        print(f"batch {batch['id']} of {args.input} on {api}", file=sys.stderr)
        try:
            batch = _follow(client, batch, args.poll_interval)
        except KeyboardInterrupt:
            client.post(f"/batches/{batch['id']}/cancel")
            print(f"\ncancelled batch {batch['id']}", file=sys.stderr)
            sys.exit(130)
        _finish(client, batch, data, Path(args.output))


def _endpoint(data: bytes, name: str) -> str:
    """The batch's endpoint: the url of its first line (the server checks the others)."""
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                message = f"tokenrelay batch: {name}: the first line is not a JSON object"
                raise SystemExit(message) from None
            if url not in ENDPOINTS:
                raise SystemExit(
                    f"tokenrelay batch: {name}: the first line's url is {url!r}; a batch runs "
                    f"{' or '.join(ENDPOINTS)}"
                )
            return str(url)
    raise SystemExit(f"tokenrelay batch: {name} has no requests")


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise SystemExit(f"tokenrelay batch: {response.request.url}: {message}")
    return response.json()  # type: ignore[no-any-return]


def _follow(client: httpx.Client, batch: dict[str, Any], interval: float) -> dict[str, Any]:
    with tqdm(total=0, unit="line", desc=batch["status"], file=sys.stderr) as bar:
        while batch["status"] not in ENDED:
            time.sleep(interval)
            batch = _ok(client.get(f"/batches/{batch['id']}"))
            counts = batch["request_counts"]
            bar.total = counts["total"]
            bar.set_description(batch["status"])
            bar.update(counts["completed"] + counts["failed"] - bar.n)
    return batch


def _finish(client: httpx.Client, batch: dict[str, Any], data: bytes, output: Path) -> None:
    if batch["status"] == "failed":
        for error in (batch.get("errors") or {}).get("data") or []:
            print(f"  {error['message']}", file=sys.stderr)
        raise SystemExit(f"tokenrelay batch: batch {batch['id']} failed")
    results: dict[str, str] = {}
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        if file_id:
            response = client.get(f"/files/{file_id}/content")
            response.raise_for_status()
            for line in response.text.splitlines():
                results[json.loads(line)["custom_id"]] = line
    order = [json.loads(raw)["custom_id"] for raw in data.splitlines() if raw.strip()]
    output.write_text("".join(results[c] + "\n" for c in order if c in results))
    counts = batch["request_counts"]
    print(
        f"batch {batch['id']} {batch['status']}: {counts['completed']} answered, "
        f"{counts['failed']} failed; results in {output}",
        file=sys.stderr,
    )
    if batch["status"] != "completed":
        sys.exit(1)
