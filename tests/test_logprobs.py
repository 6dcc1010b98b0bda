"""logprobs, top_logprobs and echo through the official openai client: OpenAI's shapes on
the fake engine's word model (whose log probabilities are LOGITS' log-softmax, worked out
here), and on the real SmolLM2 the model's own log-likelihood, computed with transformers,
for chat and completions, streamed and not, and lm-evaluation-harness's loglikelihood
request (echo, logprobs=0, max_tokens=0)."""

from __future__ import annotations

import contextlib
import io
import math
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tokenrelay.embedded_redis import EmbeddedRedis
from tokenrelay.workers.fake_words import LOGITS

from .conftest import DEMO_MODEL
from .stack import Stack

LOG_Z = math.log(sum(math.exp(v) for v in LOGITS))
W = [v - LOG_Z for v in LOGITS]  # the words' log probabilities


@pytest.fixture(scope="module")
def fake(redis_server: EmbeddedRedis) -> Iterator[openai.OpenAI]:
    s = Stack(redis_server.url, f"lp{uuid.uuid4().hex[:8]}")
    s.api()
    s.fake_worker()
    c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="EMPTY", max_retries=0, timeout=60)
    yield c
    c.close()
    s.stop()


@pytest.fixture(scope="module")
def client(model_stack: Stack) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{model_stack.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf(demo_model: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(demo_model), AutoTokenizer.from_pretrained(
        demo_model
    )


def _streamed_completion(client: openai.OpenAI, **kw: Any) -> tuple[str, dict[str, Any]]:
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    text, lp = "", {k: [] for k in keys}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                for k in lp:
                    lp[k] += getattr(c.logprobs, k)
    return text, lp


def test_completion_logprobs_shape(fake: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "fake", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    r = fake.completions.create(logprobs=2, **kw)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "w1 w1 w1 "
    assert lp is not None and lp.tokens == ["w1 "] * 3
    assert lp.token_logprobs == pytest.approx([W[1]] * 3)
    assert lp.top_logprobs == [pytest.approx({"w1 ": W[1], "w2 ": W[2]})] * 3
    assert lp.text_offset == [0, 3, 6]
    text, streamed = _streamed_completion(fake, logprobs=2, **kw)
    assert text == r.choices[0].text
    assert streamed == lp.model_dump()
    assert fake.completions.create(**kw).choices[0].logprobs is None


def test_logprobs_0_gives_the_sampled_token_alone(fake: openai.OpenAI) -> None:
    r = fake.completions.create(model="fake", prompt="hi", max_tokens=2, logprobs=0, temperature=0)
    assert r.choices[0].logprobs.top_logprobs == [pytest.approx({"w1 ": W[1]})] * 2  # type: ignore[union-attr]


def test_chat_logprobs_shape(fake: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": "fake",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "temperature": 0,
    }
    r = fake.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and [c.token for c in content] == ["w1 ", "w1 "]
    first = content[0]
    assert first.logprob == pytest.approx(W[1]) and first.bytes == list(b"w1 ")
    assert [t.token for t in first.top_logprobs] == ["w1 ", "w2 ", "w3 "]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(W[1:4])
    assert first.top_logprobs[2].bytes == list(b"w3 ")
    streamed = []
    for chunk in fake.chat.completions.create(stream=True, logprobs=True, top_logprobs=3, **kw):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs and c.logprobs.content else []
    assert streamed == content
    plain = fake.chat.completions.create(logprobs=True, **kw).choices[0].logprobs
    assert plain is not None and plain.content is not None
    assert [c.top_logprobs for c in plain.content] == [[], []]
    assert fake.chat.completions.create(**kw).choices[0].logprobs is None


def test_echo(fake: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "fake", "prompt": "w2 w3", "temperature": 0, "echo": True}
    r = fake.completions.create(max_tokens=0, **kw)
    assert r.choices[0].text == "w2 w3" and r.usage is not None
    assert r.usage.completion_tokens == 0
    r = fake.completions.create(max_tokens=2, logprobs=1, **kw)
    assert r.choices[0].text == "w2 w3w1 w1 "
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == ["w2 ", "w3 ", "w1 ", "w1 "]
    assert lp.token_logprobs == pytest.approx([None, W[3], W[1], W[1]])
    assert lp.top_logprobs is not None and lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == pytest.approx({"w3 ": W[3], "w1 ": W[1]})
    assert lp.text_offset == [0, 3, 6, 9]
    text, streamed = _streamed_completion(fake, max_tokens=2, logprobs=1, **kw)
    assert text == r.choices[0].text and streamed == lp.model_dump()


def _loglik(hf: tuple[Any, Any], ids: list[int], start: int) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= start, by transformers in float32."""
    import torch

    model, _ = hf
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(start, len(ids))]


def _greedy(hf: tuple[Any, Any], prompt: list[int], new: int) -> list[int]:
    import torch

    out = hf[0].generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
    return [int(t) for t in out[0]]


def test_chat_logprobs_are_the_models_log_likelihood(client: openai.OpenAI, hf: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)
    ids = _greedy(hf, prompt, 10)
    ref = _loglik(hf, ids, len(prompt))
    kw: dict[str, Any] = {"model": DEMO_MODEL, "messages": messages, "max_tokens": 10}
    r = client.chat.completions.create(temperature=0, logprobs=True, top_logprobs=4, **kw)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == len(ref)
    assert [c.token for c in content] == [hf[1].decode([t]) for t in ids[len(prompt) :]]
    assert sum(c.logprob for c in content) == pytest.approx(sum(ref), abs=1e-2)
    assert [c.logprob for c in content] == pytest.approx(ref, abs=2e-3)
    for c in content:
        tops = [t.logprob for t in c.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert c.top_logprobs[0].token == c.token  # greedy: the sampled token is the likeliest
    streamed = []
    for chunk in client.chat.completions.create(
        temperature=0, logprobs=True, top_logprobs=4, stream=True, **kw
    ):
        for ch in chunk.choices:
            streamed += ch.logprobs.content if ch.logprobs and ch.logprobs.content else []
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)


def test_completion_logprobs_are_the_models_log_likelihood(client: openai.OpenAI, hf: Any) -> None:
    text = "The capital of France is"
    prompt = list(hf[1](text)["input_ids"])
    ids = _greedy(hf, prompt, 6)
    ref = _loglik(hf, ids, len(prompt))
    kw: dict[str, Any] = {"model": DEMO_MODEL, "prompt": text, "max_tokens": 6, "temperature": 0}
    r = client.completions.create(logprobs=3, **kw)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and len(lp.token_logprobs) == len(ref)
    assert sum(lp.token_logprobs) == pytest.approx(sum(ref), abs=1e-2)
    assert lp.top_logprobs is not None and all(len(t) == 3 for t in lp.top_logprobs)
    _, streamed = _streamed_completion(client, logprobs=3, **kw)
    assert streamed["tokens"] == lp.tokens
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_loglikelihood_request_scores_a_continuation(client: openai.OpenAI, hf: Any) -> None:
    """lm-evaluation-harness's local-completions loglikelihood: echo the context and the
    continuation, generate nothing, and sum the continuation's token logprobs."""
    context, continuation = "The capital of France is", " Paris, a city on the Seine."
    ids = list(hf[1](context + continuation)["input_ids"])
    start = len(hf[1](context)["input_ids"])
    ref = _loglik(hf, ids, start)
    r = client.completions.create(
        model=DEMO_MODEL, prompt=context + continuation, echo=True, logprobs=0, max_tokens=0
    )
    choice = r.choices[0]
    assert choice.text == context + continuation
    assert r.usage is not None and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.text_offset is not None
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    scored = [
        v for v, at in zip(lp.token_logprobs, lp.text_offset, strict=True) if at >= len(context)
    ]
    assert scored == pytest.approx(ref, abs=2e-3)
    assert sum(scored) == pytest.approx(sum(ref), abs=1e-2)


def test_readme_example_runs_as_written(model_stack: Stack, hf: Any) -> None:
    """README's Log probabilities example, against this stack instead of port 8000."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Log probabilities and echo", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    source = code.group(1).replace("http://127.0.0.1:8000", model_stack.url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 9 and lines[0].startswith("'The' ")
    context = list(hf[1]("The capital of France is")["input_ids"])
    ref = _loglik(hf, list(hf[1]("The capital of France is Paris")["input_ids"]), len(context))
    assert float(lines[-1]) == pytest.approx(sum(ref), abs=1e-2)
