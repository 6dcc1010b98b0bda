"""Log probabilities on the real SmolLM2 in the batch, paged and hf engines: each generated
token's equals the log-softmax of transformers' own logits for it (so their sum is the
model's log-likelihood of the text), top alternatives are sorted with the greedy token
first, echo with max_tokens=0 scores every prompt token as a full forward pass does;
engines that do not score tokens refuse such jobs with a 400."""

from __future__ import annotations

import pytest
import torch

from tokenrelay.workers.batch_engine import BatchEngine
from tokenrelay.workers.engine import Engine, InvalidRequest
from tokenrelay.workers.hf_engine import HFEngine
from tokenrelay.workers.logprobs import Namer
from tokenrelay.workers.paged.engine import PagedEngine

from .engine_helpers import QUESTIONS, chat_job, completion_job, scores


@pytest.fixture(scope="module", params=["batch", "paged", "paged-3-steps", "hf"])
def engine(request, model_and_tokenizer):  # type: ignore[no-untyped-def]
    """The batch engine; the paged one with a step a launch and with three; hf."""
    model, tokenizer = model_and_tokenizer
    if request.param == "batch":
        eng: Engine = BatchEngine(model, tokenizer, slots=4, max_len=512)
    elif request.param == "hf":
        eng = HFEngine(model, tokenizer)
    else:
        steps = 3 if request.param == "paged-3-steps" else 1
        eng = PagedEngine(
            model, tokenizer, num_blocks=128, max_seqs=4, max_len=512, steps_per_launch=steps
        )
    yield eng
    eng.close()


def reference(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """log p(ids[i] | ids[:i]) for i >= 1, from transformers' forward in float32."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


async def test_generated_logprobs_are_the_models_own(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    job = chat_job(QUESTIONS[0], temperature=0, max_tokens=12, logprobs=5)
    _, got = await scores(engine, job)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"][0].tolist()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0].tolist()
    generated = out[len(prompt) :]
    assert len(got) == len(generated)  # the EOS that ends it scored too (as vLLM's)
    namer = Namer(tokenizer)
    assert [e.token for e in got] == [namer.name(t)[0] for t in generated]
    ref = reference(model, out)[len(prompt) - 1 :]
    torch.testing.assert_close(torch.tensor([e.logprob for e in got]), ref, atol=2e-3, rtol=0)
    torch.testing.assert_close(
        torch.tensor(sum(e.logprob or 0.0 for e in got)), ref.sum(), atol=1e-2, rtol=0
    )
    for e in got:
        tops = [t.logprob for t in e.top]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e.top[0].token == e.token  # greedy: the likeliest
        assert e.bytes is not None and bytes(e.bytes).decode("utf-8", "replace")


async def test_sampled_tokens_score_under_the_raw_distribution(engine) -> None:  # type: ignore[no-untyped-def]
    """Temperature and penalties change what is drawn, not the reported (raw) scores:
    a token's logprob is never above the likeliest alternative's."""
    job = chat_job(
        QUESTIONS[1], temperature=1.5, seed=3, max_tokens=8, logprobs=2, presence_penalty=1.0
    )
    _, got = await scores(engine, job)
    assert len(got) >= 1
    for e in got:
        assert e.logprob is not None and e.logprob <= e.top[0].logprob + 1e-6
        assert len(e.top) == 2


async def test_echo_scores_the_prompt_with_max_tokens_0(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """lm-evaluation-harness's loglikelihood request: echo, logprobs=0, max_tokens=0."""
    model, tokenizer = model_and_tokenizer
    text = "The capital of France is Paris"
    prompt, generated = await scores(
        engine, completion_job(text, max_tokens=0, logprobs=0, prompt_logprobs=0)
    )
    ids = tokenizer(text)["input_ids"]
    assert generated == []
    assert [e.token for e in prompt] == [tokenizer.decode([i]) for i in ids]
    assert prompt[0].logprob is None
    ref = reference(model, ids)
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in prompt[1:]]), ref, atol=2e-3, rtol=0
    )
    assert all(e.top == [] for e in prompt)


async def test_echo_then_generation(engine) -> None:  # type: ignore[no-untyped-def]
    prompt, generated = await scores(
        engine,
        completion_job("One, two,", temperature=0, max_tokens=3, logprobs=1, prompt_logprobs=1),
    )
    assert len(prompt) >= 3 and all(len(e.top) == 1 for e in prompt[1:])
    assert 1 <= len(generated) <= 3


def test_engines_that_do_not_score_refuse() -> None:
    from tokenrelay.workers.logprobs import refuse_logprobs

    with pytest.raises(InvalidRequest, match="not supported") as info:
        refuse_logprobs(completion_job("x", logprobs=1), "generate")
    assert info.value.param == "logprobs"
    with pytest.raises(InvalidRequest) as info:
        refuse_logprobs(completion_job("x", max_tokens=0), "generate")
    assert info.value.param == "max_tokens"
    refuse_logprobs(completion_job("x", max_tokens=4), "generate")
