"""Log probabilities in the paged engine on a GPU (CUDA graphs, Triton attention, three
steps a launch), on random Llama weights: each greedy token's logprob equals the
log-softmax of transformers' logits on the same weights, the top alternatives are sorted
with the greedy token first, and echo with max_tokens=0 scores the prompt as a full
forward pass does."""

from __future__ import annotations

import pytest
import torch

from tokenrelay.bench.models import prompt_words, random_llama, synthetic_tokenizer
from tokenrelay.workers.paged.engine import PagedEngine

from .engine_helpers import completion_job, scores

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    torch.backends.cuda.matmul.allow_tf32 = False
    return random_llama("1b", "cuda", torch.float32)


def _reference(model, ids: list[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device="cuda")).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()


async def test_paged_logprobs_on_gpu(model) -> None:  # type: ignore[no-untyped-def]
    tokenizer = synthetic_tokenizer()
    engine = PagedEngine(
        model, tokenizer, num_blocks=256, max_seqs=4, max_len=512, steps_per_launch=3
    )
    try:
        text = prompt_words(40, salt=3)
        ids = tokenizer(text)["input_ids"]
        job = completion_job(
            text, temperature=0, max_tokens=12, ignore_eos=True, logprobs=4, prompt_logprobs=2
        )
        prompt, generated = await scores(engine, job)
        only, none = await scores(
            engine, completion_job(text, max_tokens=0, logprobs=0, prompt_logprobs=0)
        )
    finally:
        engine.close()
    assert len(generated) == 12 and len(prompt) == len(ids)
    out = ids + [int(tokenizer.convert_tokens_to_ids(e.token.strip())) for e in generated]
    lp = _reference(model, out)
    want = lp[:-1].gather(-1, torch.tensor(out[1:])[:, None])[:, 0]
    got_prompt = torch.tensor([e.logprob for e in prompt[1:]])
    torch.testing.assert_close(got_prompt, want[: len(ids) - 1], atol=2e-3, rtol=0)
    got = torch.tensor([e.logprob for e in generated])
    torch.testing.assert_close(got, want[len(ids) - 1 :], atol=2e-3, rtol=0)
    for e in generated:
        tops = [t.logprob for t in e.top]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert e.top[0].token == e.token
    assert prompt[0].logprob is None and all(len(e.top) == 2 for e in prompt[1:])
    assert none == [] and only[0].logprob is None
    torch.testing.assert_close(
        torch.tensor([e.logprob for e in only[1:]]), got_prompt, atol=1e-4, rtol=0
    )
