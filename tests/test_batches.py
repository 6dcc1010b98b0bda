"""The Batch API with the fake engine: a real redis-server, `tokenrelay api`, a fake-engine
worker and `tokenrelay batch-worker` processes (RQ), driven by the official openai client.

Validation, error lines, cancel, expiry and a batch worker SIGKILLed mid-batch; the real
model answers a batch in tests/test_batches_model.py.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
from rq import Worker
from rq.job import Job as RQJob
from rq.serializers import JSONSerializer

from tokenrelay.commands import tokenrelay_argv
from tokenrelay.embedded_redis import EmbeddedRedis
from tokenrelay.queueing import batch_queue
from tokenrelay.queueing.batches import Batch, BatchStore
from tokenrelay.queueing.connection import RedisSettings, connect

from .batch_files import chat_line, completion_line, jsonl, lines_of, start, wait_for
from .openai_errors import assert_error
from .stack import Process, Stack

KEY = "batch-test-key"
TOKEN_DELAY = 0.02  # seconds a fake token takes: a line of max_tokens=50 lasts a second


@pytest.fixture(scope="module")
def batch_stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    s = Stack(redis_server.url, f"b{uuid.uuid4().hex[:8]}")
    s.api("--api-keys", KEY)
    worker = s.fake_worker("--fake-token-delay", str(TOKEN_DELAY), wait=False)
    batch_worker = s.batch_worker(wait=False)  # both start at once: a CI box has 2 cores
    s.wait_workers(1, worker)
    s.wait_batch_workers(1, batch_worker)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(batch_stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{batch_stack.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield c
    c.close()


def test_a_batch_of_chat_lines_completes_with_answers_and_errors_by_custom_id(
    client: openai.OpenAI,
) -> None:
    lines = [chat_line(f"ok-{i}", "fake", f"question {i}", max_tokens=3) for i in range(6)]
    lines.insert(2, chat_line("unknown-model", "no-such-model", "hi"))
    lines.insert(4, chat_line("too-long", "fake", "hi", max_tokens=100_000))
    lines.insert(5, chat_line("too-many-chars", "fake", "x" * 200_001))  # --max-prompt-chars
    created = start(client, lines)
    assert created.status == "validating" and created.object == "batch"
    assert created.expires_at == created.created_at + 86400

    batch = wait_for(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed) == (9, 6)
    assert batch.request_counts.failed == 3
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    answers = {x["custom_id"]: x for x in lines_of(client, batch.output_file_id)}
    assert sorted(answers) == [f"ok-{i}" for i in range(6)]
    for answer in answers.values():
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 3
    assert batch.usage is not None and batch.usage.output_tokens == 18

    errors = {x["custom_id"]: x["response"] for x in lines_of(client, batch.error_file_id)}
    assert errors["unknown-model"]["status_code"] == 404
    assert errors["unknown-model"]["body"]["error"]["code"] == "model_not_found"
    assert errors["too-long"]["status_code"] == 400
    assert errors["too-long"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["too-many-chars"]["status_code"] == 400
    too_many = errors["too-many-chars"]["body"]["error"]
    assert too_many["code"] == "prompt_too_long" and too_many["param"] == "messages"
    output = client.files.retrieve(batch.output_file_id or "")
    assert output.purpose == "batch_output"


def test_a_completions_batch_lists_and_pages(client: openai.OpenAI) -> None:
    lines = [completion_line(f"c{i}", "fake", f"once upon {i}", max_tokens=2) for i in range(3)]
    first = start(client, lines, "/v1/completions")
    second = start(client, lines, "/v1/completions")
    batch = wait_for(client, second.id)
    assert batch.status == "completed" and batch.endpoint == "/v1/completions"
    body = lines_of(client, batch.output_file_id)[0]["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"]

    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    assert [b.id for b in client.batches.list(limit=1, after=second.id).data] == [first.id]


def test_a_malformed_file_fails_in_validating_with_errors_naming_the_lines(
    client: openai.OpenAI,
) -> None:
    good = chat_line("a", "fake", "hi")
    lines = [
        good,
        "not json",
        chat_line("a", "fake", "same custom_id"),
        {**chat_line("b", "fake", "hi"), "url": "/v1/completions"},
        chat_line("c", "fake", "hi", stream=True),
        chat_line("d", "fake", "hi", temperature=5),
    ]
    text = jsonl(lines).replace(b'"not json"', b"not json")
    upload = client.files.create(file=("bad.jsonl", text), purpose="batch")
    created = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for(client, created.id)
    assert batch.status == "failed" and batch.failed_at and batch.in_progress_at is None
    assert batch.errors is not None and batch.errors.data is not None
    found = {(e.line, e.code, e.param) for e in batch.errors.data}
    assert found == {
        (2, "invalid_json_line", None),
        (3, "duplicate_custom_id", "custom_id"),
        (4, "mismatched_url", "url"),
        (5, "stream_not_supported", "body.stream"),
        (6, "invalid_value", "body.temperature"),
    }
    assert all(e.message and e.message.startswith(f"Line {e.line}:") for e in batch.errors.data)
    assert batch.output_file_id is None and batch.error_file_id is None


def test_cancel_keeps_finished_lines_and_stops_queued_ones(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=50) for i in range(30)]
    created = start(client, lines)
    wait_for(client, created.id, lambda b: b.request_counts and b.request_counts.completed >= 2)
    asked = time.monotonic()
    cancelling = client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for(client, created.id, timeout=10)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert time.monotonic() - asked < 5
    answers = lines_of(client, batch.output_file_id)
    cut = [x for x in lines_of(client, batch.error_file_id) if x["error"]]
    assert batch.request_counts is not None
    assert len(answers) == batch.request_counts.completed >= 2
    assert len(answers) + len(cut) == 30 == batch.request_counts.total
    assert {x["error"]["code"] for x in cut} == {"batch_cancelled"}
    # the lines' jobs are gone from the batch lane: the queued ones were dropped
    lane = f"{batch_stack.prefix}:{{m:fake}}:batch-jobs"
    import redis

    r = redis.Redis.from_url(batch_stack.redis_url)
    deadline = time.monotonic() + 5
    while r.xlen(lane) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.xlen(lane) == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.batches.cancel(wait_for(client, start(client, lines[:1]).id).id)
    assert err.value.code == "invalid_state"


def test_a_short_window_ends_expired_with_partial_output(
    batch_stack: Stack, redis_server: EmbeddedRedis
) -> None:
    short = Stack(redis_server.url, batch_stack.prefix)
    short.api("--api-keys", KEY, "--batch-window", "3")
    try:
        c = openai.OpenAI(base_url=f"{short.url}/v1", api_key=KEY, max_retries=0)
        lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=50) for i in range(40)]
        created = start(c, lines)
        assert created.expires_at == created.created_at + 3
        batch = wait_for(c, created.id, timeout=15)
        assert batch.status == "expired" and batch.expired_at
        answers = lines_of(c, batch.output_file_id)
        cut = [x for x in lines_of(c, batch.error_file_id) if x["error"]]
        assert answers and cut and len(answers) + len(cut) == 40
        assert {x["error"]["code"] for x in cut} == {"batch_expired"}
    finally:
        short.stop()


def test_a_batch_no_batch_worker_took_up_ends_expired_when_its_window_is_over(
    redis_server: EmbeddedRedis,
) -> None:
    """No `tokenrelay batch-worker` runs on this prefix: once the window is over the batch
    reads expired (not validating for ever), in retrieve and in the list."""
    lonely = Stack(redis_server.url, f"n{uuid.uuid4().hex[:8]}")
    lonely.api("--api-keys", KEY, "--batch-window", "2")
    try:
        c = openai.OpenAI(base_url=f"{lonely.url}/v1", api_key=KEY, max_retries=0)
        created = start(c, [chat_line("only", "fake", "hi")])
        assert c.batches.retrieve(created.id).status == "validating"
        time.sleep(max(0.0, created.expires_at - time.time()) + 0.5)
        listed = {b.id: b for b in c.batches.list()}
        assert listed[created.id].status == "expired"
        batch = c.batches.retrieve(created.id)
        assert batch.status == "expired" and batch.expired_at
        assert batch.output_file_id is None and batch.in_progress_at is None
    finally:
        lonely.stop()


def _kill_with_its_horse(proc: Process, stack: Stack) -> None:
    """SIGKILL a batch worker and its work horse (in its own process group), as a lost
    machine or the OOM killer would."""
    for child in psutil.Process(proc.popen.pid).children(recursive=True):
        child.kill()
    proc.kill()
    _unregister(stack, proc)


def _unregister(stack: Stack, proc: Process) -> None:
    """Drop a killed batch worker from RQ's worker registry now. RQ keeps a worker that died
    without its clean exit registered until its key expires (its heartbeat TTL plus a
    minute), so later tests counting batch workers would count it too."""
    settings = RedisSettings(url=stack.redis_url, prefix=stack.prefix)
    connection = batch_queue.sync_connect(settings)
    try:
        queue = batch_queue.batch_queue(connection, settings.keys)
        for worker in Worker.all(queue=queue):
            if worker.pid == proc.popen.pid:
                worker.register_death()
    finally:
        connection.close()


def test_a_batch_worker_killed_mid_batch_is_resumed_without_loss_or_duplicates(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=12) for i in range(40)]
    created = start(client, lines)
    wait_for(client, created.id, lambda b: b.request_counts and b.request_counts.completed >= 5)
    (worker,) = [p for p in batch_stack.processes if p.name == "batch-worker" and p.alive()]
    _kill_with_its_horse(worker, batch_stack)
    assert client.batches.retrieve(created.id).status == "in_progress"
    batch_stack.batch_worker()  # as serve's supervisor or compose's restart would

    batch = wait_for(client, created.id, timeout=60)
    assert batch.status == "completed", batch
    answers = [x["custom_id"] for x in lines_of(client, batch.output_file_id)]
    assert sorted(answers) == sorted(f"l{i}" for i in range(40))  # each exactly once
    assert batch.error_file_id is None
    assert batch.request_counts is not None and batch.request_counts.completed == 40


def test_a_batch_worker_killed_alone_takes_its_horse_and_the_batch_resumes(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    """`kill -9` of the batch worker only (what a user or serve's supervisor sees): its work
    horse, in its own process group, used to run the batch on, unsupervised, past the serve
    that started the worker. It dies with the worker now, and the batch resumes as any."""
    # lines of a second each, six at a time: the batch has seconds left after the kill
    lines = [chat_line(f"h{i}", "fake", f"q{i}", max_tokens=50) for i in range(40)]
    created = start(client, lines)
    wait_for(client, created.id, lambda b: b.request_counts and b.request_counts.completed >= 5)
    (worker,) = [p for p in batch_stack.processes if p.name == "batch-worker" and p.alive()]
    horses = psutil.Process(worker.popen.pid).children(recursive=True)
    assert horses, "the batch worker has no work horse running the batch"
    worker.kill()
    _, alive = psutil.wait_procs(horses, timeout=3)
    assert not alive, f"the work horse outlived its batch worker: {alive}"
    _unregister(batch_stack, worker)
    batch_stack.batch_worker()

    batch = wait_for(client, created.id, timeout=60)
    assert batch.status == "completed", batch
    answers = [x["custom_id"] for x in lines_of(client, batch.output_file_id)]
    assert sorted(answers) == sorted(f"h{i}" for i in range(40))  # each exactly once


def test_a_batch_worker_stopped_with_sigterm_hands_its_batch_back_without_a_retry(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    """A restart (SIGTERM: serve's stop, a deploy, compose down) is not a failure: the batch
    goes back to the queue with all of RQ's retries left, and the next worker finishes it."""
    lines = [chat_line(f"t{i}", "fake", f"q{i}", max_tokens=50) for i in range(40)]
    created = start(client, lines)
    wait_for(client, created.id, lambda b: b.request_counts and b.request_counts.completed >= 5)
    (worker,) = [p for p in batch_stack.processes if p.name == "batch-worker" and p.alive()]
    worker.kill(signal.SIGTERM)
    settings = RedisSettings(url=batch_stack.redis_url, prefix=batch_stack.prefix)
    connection = batch_queue.sync_connect(settings)
    try:
        job = RQJob.fetch(created.id, connection=connection, serializer=JSONSerializer)
        assert job.retries_left == batch_queue.RETRIES
    finally:
        connection.close()
    batch_stack.batch_worker()

    batch = wait_for(client, created.id, timeout=60)
    assert batch.status == "completed", batch
    answers = [x["custom_id"] for x in lines_of(client, batch.output_file_id)]
    assert sorted(answers) == sorted(f"t{i}" for i in range(40))  # each exactly once


def test_batch_routes_need_the_api_key(batch_stack: Stack) -> None:
    routes = [
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/batches/batch_x"),
        ("POST", "/v1/batches/batch_x/cancel"),
    ]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, batch_stack.url + path, headers=headers, json={})
            assert_error(r, 401, "invalid_api_key")


def test_bad_batch_requests_are_openai_shaped_4xx(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    upload = client.files.create(
        file=("r.jsonl", jsonl([chat_line("a", "fake", "hi")])), purpose="batch"
    )
    good = {
        "input_file_id": upload.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"input_file_id": "file-nope"}, 404, "file_not_found"),
        ({"endpoint": "/v1/responses"}, 400, "invalid_value"),  # not served here
        ({"completion_window": "1h"}, 400, "invalid_value"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "invalid_value"),
        ({"input_file_id": None}, 400, "invalid_value"),
    ]
    for change, status, code in cases:
        r = httpx.post(f"{batch_stack.url}/v1/batches", json={**good, **change}, headers=auth)
        assert_error(r, status, code)
    for method, path, status, code in [
        ("GET", "/v1/batches/batch_nope", 404, "batch_not_found"),
        ("POST", "/v1/batches/batch_nope/cancel", 404, "batch_not_found"),
        ("GET", "/v1/batches?limit=0", 400, "invalid_value"),
        ("GET", "/v1/batches?limit=abc", 400, "invalid_value"),
        ("GET", "/v1/batches?limit=%C2%B9", 400, "invalid_value"),  # '¹': a digit, no int
    ]:
        assert_error(httpx.request(method, batch_stack.url + path, headers=auth), status, code)


def test_batch_run_writes_every_line_in_input_order(
    batch_stack: Stack, tmp_path: pathlib.Path
) -> None:
    lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=2) for i in range(5)]
    lines.insert(3, chat_line("unknown", "no-such-model", "hi"))
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(jsonl(lines))
    argv = ["batch", "run", str(source), "-o", str(output)]
    argv += ["--api-url", f"{batch_stack.url}/v1", "--api-key", KEY, "--poll-interval", "0.2"]
    done = subprocess.run(tokenrelay_argv(*argv), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "completed: 5 answered, 1 failed" in done.stderr
    written = [json.loads(x) for x in output.read_text().splitlines()]
    assert [x["custom_id"] for x in written] == [x["custom_id"] for x in lines]
    assert written[3]["response"]["status_code"] == 404
    assert all(x["response"]["status_code"] == 200 for x in written[:3] + written[4:])


def test_status_and_metrics_show_running_batches_and_the_rq_queue(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=50) for i in range(20)]
    created = start(client, lines)
    wait_for(client, created.id, lambda b: b.request_counts and b.request_counts.completed >= 1)
    auth = {"Authorization": f"Bearer {KEY}"}
    status = httpx.get(f"{batch_stack.url}/v1/status", headers=auth).json()
    (active,) = [b for b in status["batches"]["active"] if b["id"] == created.id]
    assert active["status"] == "in_progress" and active["total"] == 20
    assert active["completed"] >= 1 and active["model"] == "fake"
    queue = status["batches"]["queue"]
    assert queue["name"] == f"{batch_stack.prefix}-batches"
    assert (queue["running"], queue["workers"]) == (1, 1)

    metrics = httpx.get(f"{batch_stack.url}/metrics").text
    assert 'tokenrelay:batches{status="in_progress"} 1.0' in metrics
    assert 'tokenrelay:batch_lines{state="total"} 20.0' in metrics
    assert 'tokenrelay:batch_jobs{state="running"} 1.0' in metrics
    assert "tokenrelay:batch_workers 1.0" in metrics

    argv = ["status", "--redis-url", batch_stack.redis_url, "--key-prefix", batch_stack.prefix]
    shown = subprocess.run(tokenrelay_argv(*argv), capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    (row,) = [line.split() for line in shown.stdout.splitlines() if created.id in line]
    assert row[1:4] == ["in_progress", "fake", "20"]
    assert f"batch queue {batch_stack.prefix}-batches: 0 queued, 1 running" in shown.stdout
    with contextlib.suppress(openai.BadRequestError):  # unless it has completed meanwhile
        client.batches.cancel(created.id)
    wait_for(client, created.id)


async def test_a_resumed_line_whose_answer_expired_meanwhile_runs_again(
    client: openai.OpenAI, batch_stack: Stack
) -> None:
    """A run that resumes a line a dead run queued long ago: its job is done and its chunk
    log expired, so its enqueue marker alone would dedupe it into a wait for ever."""
    settings = RedisSettings(url=batch_stack.redis_url, prefix=batch_stack.prefix)
    redis = connect(settings)
    store = BatchStore(redis, settings.keys)
    lines = [chat_line(f"l{i}", "fake", f"q{i}", max_tokens=2) for i in range(2)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    now = int(time.time())
    batch = Batch(
        id=store.new_id(),
        endpoint="/v1/chat/completions",
        input_file_id=upload.id,
        completion_window="24h",
        status="in_progress",  # as a run that died left it
        created_at=now,
        expires_at=now + 3600,
        in_progress_at=now,
        total=2,
    )
    await store.create(batch)
    gone = f"chatcmpl-{batch.id}-1"  # line 1's job: its marker, nothing else
    await redis.set(settings.keys.enqueued("fake", gone), "1-0", ex=3600)
    batch_queue.enqueue(batch_queue.sync_connect(settings), settings.keys, batch.id, 3600)
    await redis.aclose()

    done = wait_for(client, batch.id, timeout=20)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 2
