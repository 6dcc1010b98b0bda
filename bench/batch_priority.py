"""Interactive time to first token on an idle server against the same with a Batch API batch
running (issue 12's priority rule, with the real model).

Against a running `tokenrelay serve` (or any tokenrelay API: --api-url), in one run, it
alternates phases, ``idle`` then ``batch``, for --rounds rounds:

- ``idle``: nothing else runs (it first waits until the model's queues are empty); it sends
  --requests streamed chat requests one after another and times each one's first content
  token.
- ``batch``: it uploads a file of --batch-lines chat lines, creates a batch of it, waits
  until the worker has taken up as many lines as the batch lane allows (its slots less the
  reserve), sends the same interactive requests, then cancels the batch (its remaining
  lines would take many minutes on a CPU) and waits until the lane is empty again. Every
  interactive request records how many batch lines were queued and running just before it
  was sent, so a reader can see the batch was running throughout.

Each phase also records the load average before and after, and (when the server's
processes are on this machine, found through serve's runtime file) the share of the CPU
that processes other than the server and this script took meanwhile ("foreign"), since
the machine may be shared.

    .venv/bin/python bench/batch_priority.py --rounds 3 --requests 12 \\
        --out bench-results/cpu-batch-priority.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tokenrelay import runtime
from tokenrelay.workers.lanes import batch_reserve

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the rainbow.",
    "How many legs does a spider have?",
    "What is two plus two?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
]
TOPICS = ["the sea", "a mountain", "a city at night", "a forest", "a robot", "the moon"]
TERMINAL = ("completed", "failed", "expired", "cancelled")


def main() -> None:
    args = _parse()
    api = runtime.api_url(args.api_url).rstrip("/")
    serve = runtime.running() if not args.api_url else None
    headers = {"Authorization": f"Bearer {args.api_key}"}
    with httpx.Client(base_url=api, headers=headers, timeout=120) as client:
        status = _ok(client.get("/status"))
        model = args.model or status["models"][0]["name"]
        workers = [w for w in status["workers"] if model in w["models"]]
        capacity = sum(int(w["capacity"]) for w in workers)
        batch_room = sum(int(w["capacity"]) - batch_reserve(int(w["capacity"])) for w in workers)
        _log(
            f"{api}, model {model}: {len(workers)} worker(s), {capacity} slots, "
            f"{batch_room} for batch lines"
        )
        for i in range(args.warmup):
            _interactive(client, model, i, args)
        phases = []
        for round_no in range(1, args.rounds + 1):
            for kind in ("idle", "batch"):
                phase = _phase(client, kind, round_no, model, batch_room, serve, args)
                phases.append(phase)
                s = phase["summary"]
                _log(
                    f"round {round_no} {kind:5}: TTFT p50 {s['ttft_p50_ms']} ms, "
                    f"p90 {s['ttft_p90_ms']} ms, load {phase['loadavg_before'][0]:.2f}"
                    f" -> {phase['loadavg_after'][0]:.2f}, foreign {phase['foreign_cpu']}"
                )
    result = {
        "what": "interactive chat TTFT, idle server against a running batch (issue 12)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": _cpu_name(),
            "python": platform.python_version(),
        },
        "api_url": api,
        "model": model,
        "workers": workers,
        "batch_room": batch_room,
        "settings": {
            k: getattr(args, k)
            for k in ("rounds", "requests", "batch_lines", "max_tokens", "batch_max_tokens", "gap")
        },
        "phases": phases,
        "summary": _overall(phases),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        _log(f"wrote {args.out}")
    print(json.dumps(result["summary"], indent=2))


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--api-url", help="default: the running serve's API")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    p.add_argument("--model", help="default: the first model the status lists")
    p.add_argument("--rounds", type=int, default=3, help="idle + batch pairs")
    p.add_argument("--requests", type=int, default=12, help="interactive requests a phase")
    p.add_argument("--warmup", type=int, default=2, help="interactive requests before it all")
    p.add_argument("--batch-lines", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=16, help="an interactive request's")
    p.add_argument("--batch-max-tokens", type=int, default=128, help="a batch line's")
    p.add_argument("--gap", type=float, default=0.5, help="seconds between interactive requests")
    p.add_argument("--out", help="write the results JSON here")
    return p.parse_args()


def _phase(
    client: httpx.Client,
    kind: str,
    round_no: int,
    model: str,
    batch_room: int,
    serve: runtime.ServeInfo | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    _until_quiet(client, model)
    batch = None
    if kind == "batch":
        batch = _start_batch(client, model, round_no, args)
        _until_lines_running(client, model, batch["id"], batch_room)
    load_before = os.getloadavg()
    cpu_before = _cpu(serve)
    records = []
    for i in range(args.requests):
        lane = _lane(client, model)
        record = _interactive(client, model, i, args)
        record.update(batch_queued_before=lane[0], batch_running_before=lane[1])
        records.append(record)
        time.sleep(args.gap)
    cpu_after = _cpu(serve)
    load_after = os.getloadavg()
    phase: dict[str, Any] = {
        "round": round_no,
        "kind": kind,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "foreign_cpu": _foreign(cpu_before, cpu_after),
        "requests": records,
        "summary": _summary(records),
    }
    if batch is not None:
        phase["batch"] = _stop_batch(client, batch["id"])
    return phase


def _interactive(
    client: httpx.Client, model: str, i: int, args: argparse.Namespace
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = None
    with client.stream("POST", "/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"interactive request: {r.status_code} {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                raise SystemExit(f"interactive request: {event}")
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter() - started
    if first is None:
        raise SystemExit("interactive request: the stream ended without content")
    return {"ttft_ms": round(first * 1000, 1), "e2e_ms": round(end * 1000, 1), "tokens": tokens}


def _start_batch(
    client: httpx.Client, model: str, round_no: int, args: argparse.Namespace
) -> dict[str, Any]:
    lines = []
    for i in range(args.batch_lines):
        topic = TOPICS[i % len(TOPICS)]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Write a long story about {topic}. ({i})"}],
            "max_tokens": args.batch_max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # every line runs its full length
        }
        lines.append(
            {
                "custom_id": f"r{round_no}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
        )
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = _ok(
        client.post("/files", files={"file": ("priority.jsonl", data)}, data={"purpose": "batch"})
    )
    batch = _ok(
        client.post(
            "/batches",
            json={
                "input_file_id": upload["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"bench": "batch_priority"},
            },
        )
    )
    _log(f"batch {batch['id']}: {args.batch_lines} lines of {args.batch_max_tokens} tokens")
    return batch


def _until_lines_running(client: httpx.Client, model: str, batch_id: str, room: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        queued, running = _lane(client, model)
        if running >= room and queued > 0:
            return
        batch = _ok(client.get(f"/batches/{batch_id}"))
        if batch["status"] in TERMINAL:
            raise SystemExit(f"batch {batch_id} ended before the measurement: {batch}")
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id}: {running} lines running after 300 s")
        time.sleep(0.2)


def _stop_batch(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    before = _ok(client.get(f"/batches/{batch_id}"))
    _ok(client.post(f"/batches/{batch_id}/cancel"))
    deadline = time.monotonic() + 120
    batch = before
    while batch["status"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {batch_id} still {batch['status']} 120 s after its cancel")
        time.sleep(0.5)
        batch = _ok(client.get(f"/batches/{batch_id}"))
    return {
        "id": batch_id,
        "status_during": before["status"],
        "request_counts_at_cancel": before["request_counts"],
        "final_status": batch["status"],
    }


def _until_quiet(client: httpx.Client, model: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        row = _model_row(client, model)
        busy = row["queued"] + row["running"] + row["batch_queued"] + row["batch_running"]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the model's queues are not empty after 300 s: {row}")
        time.sleep(0.5)


def _lane(client: httpx.Client, model: str) -> tuple[int, int]:
    row = _model_row(client, model)
    return int(row["batch_queued"]), int(row["batch_running"])


def _model_row(client: httpx.Client, model: str) -> dict[str, Any]:
    for row in _ok(client.get("/status"))["models"]:
        if row["name"] == model:
            return row  # type: ignore[no-any-return]
    raise SystemExit(f"model {model} is not in the status")


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = [r["ttft_ms"] for r in records]
    return {
        "n": len(ttft),
        "ttft_p50_ms": _pct(ttft, 0.5),
        "ttft_p90_ms": _pct(ttft, 0.9),
        "ttft_mean_ms": round(statistics.fmean(ttft), 1),
        "e2e_p50_ms": _pct([r["e2e_ms"] for r in records], 0.5),
        "batch_running_min": min((r.get("batch_running_before", 0) for r in records), default=0),
    }


def _overall(phases: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": []}
    for round_no in sorted({p["round"] for p in phases}):
        idle = next(p for p in phases if p["round"] == round_no and p["kind"] == "idle")
        busy = next(p for p in phases if p["round"] == round_no and p["kind"] == "batch")
        out["rounds"].append(
            {
                "round": round_no,
                "idle_p50_ms": idle["summary"]["ttft_p50_ms"],
                "idle_p90_ms": idle["summary"]["ttft_p90_ms"],
                "batch_p50_ms": busy["summary"]["ttft_p50_ms"],
                "batch_p90_ms": busy["summary"]["ttft_p90_ms"],
                "p50_ratio": round(
                    busy["summary"]["ttft_p50_ms"] / idle["summary"]["ttft_p50_ms"], 2
                ),
            }
        )
    for kind in ("idle", "batch"):
        ttft = [r["ttft_ms"] for p in phases if p["kind"] == kind for r in p["requests"]]
        out[kind] = {"n": len(ttft), "ttft_p50_ms": _pct(ttft, 0.5), "ttft_p90_ms": _pct(ttft, 0.9)}
    out["p50_ratio"] = round(out["batch"]["ttft_p50_ms"] / out["idle"]["ttft_p50_ms"], 2)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


# --- where the CPU went: the server's processes and this script against the whole machine


def _cpu(serve: runtime.ServeInfo | None) -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU seconds of the machine, CPU seconds of serve's process tree
    and this script), or None when serve's processes are not known here."""
    if serve is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick  # less idle and iowait
    ours = 0.0
    for pid in _tree(serve.pid) | {os.getpid()}:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ours += (int(stat[11]) + int(stat[12])) / tick  # utime, stime
    return time.monotonic(), busy, ours


def _tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def _foreign(
    before: tuple[float, float, float] | None, after: tuple[float, float, float] | None
) -> float | None:
    """Share of the machine's CPU (0-1) that other processes took between the two samples."""
    if before is None or after is None:
        return None
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise SystemExit(f"{response.request.url}: {response.status_code} {response.text}")
    return response.json()  # type: ignore[no-any-return]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
