"""Sampling fields a request leaves out take the model's generation_config defaults.

Bug: a request without ``temperature`` sampled at a fixed 1.0 whatever the model; the
demo SmolLM2 folder now carries its model card's 0.2 and top_p 0.9, and the worker
applies them.
"""

from __future__ import annotations

import json

import openai

from tokenrelay.api.schemas import ChatCompletionRequest, CompletionRequest

from .conftest import DEMO_MODEL
from .stack import Stack

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wire(request: ChatCompletionRequest | CompletionRequest) -> dict[str, object]:
    return json.loads(request.to_job(60).model_dump_json())["params"]  # type: ignore[no-any-return]


def test_the_api_passes_on_only_the_sampling_fields_given() -> None:
    left_out = _wire(ChatCompletionRequest(model="m", messages=QUESTION))
    assert not {"temperature", "top_p", "top_k"} & set(left_out), left_out
    nulls = _wire(CompletionRequest(model="m", prompt="hi", temperature=None, top_p=None))
    assert not {"temperature", "top_p", "top_k"} & set(nulls), nulls

    given = _wire(ChatCompletionRequest(model="m", messages=QUESTION, temperature=1, top_k=-1))
    assert (given["temperature"], given["top_k"]) == (1.0, 0)
    assert "top_p" not in given


def test_left_out_fields_sample_as_the_models_defaults(model_stack: Stack) -> None:
    """Through the whole stack, a seeded request without temperature and top_p gives the
    same text as one that asks for the demo folder's 0.2 and 0.9 by name, and not what the
    old fixed temperature of 1.0 gives."""
    client = openai.OpenAI(base_url=f"{model_stack.url}/v1", api_key="EMPTY", max_retries=0)

    def answer(seed: int, **sampling: float) -> str:
        r = client.chat.completions.create(
            model=DEMO_MODEL, messages=QUESTION, max_tokens=16, seed=seed, **sampling
        )
        return r.choices[0].message.content or ""

    seeds = range(3)
    defaults = [answer(s) for s in seeds]
    assert defaults == [answer(s, temperature=0.2, top_p=0.9) for s in seeds]
    assert defaults != [answer(s, temperature=1.0, top_p=1.0) for s in seeds]
    client.close()
