"""Each sampling extra on the real SmolLM2, in every engine (the slotted batch engine, the
paged engine three steps a launch, the transformers step engine, the generate() baseline): the
greedy text equals a reference written here from the fields' definitions (a full forward
pass a token, the adjustment in plain Python), and differs from plain greedy where the
field should change it."""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
import torch

from tokenrelay.workers.batch_engine import BatchEngine
from tokenrelay.workers.generate_engine import GenerateEngine
from tokenrelay.workers.hf_engine import HFEngine, eos_ids
from tokenrelay.workers.paged.engine import PagedEngine
from tokenrelay.workers.prompts import encode_prompt

from .engine_helpers import chat_job, collect

# greedy: "The waves of the ocean, a tapestry woven with life,\nA canvas of endless blue, a";
# a penalty on the repeated "," turns the second one into "'s endless threads."
REPEAT = "Write a short poem about the sea."
SHORT = "What color is the sky? Answer with one word."
TOKENS = 20


@pytest.fixture(
    scope="module",
    # the transformers-based engines are the slow half of this module on a 2-core CI box:
    # they run with --runslow (the batch and paged engines share the sampler code they test)
    params=[
        "batch",
        "paged",
        pytest.param("hf", marks=pytest.mark.slow),
        pytest.param("generate", marks=pytest.mark.slow),
    ],
)
def engine(request, model_and_tokenizer):  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    if request.param == "batch":
        eng = BatchEngine(model, tokenizer, slots=4, max_len=256)
    elif request.param == "paged":
        eng = PagedEngine(
            model, tokenizer, num_blocks=64, max_seqs=4, max_len=256, steps_per_launch=3
        )
    elif request.param == "hf":
        eng = HFEngine(model, tokenizer)
    else:
        eng = GenerateEngine(model, tokenizer)
    yield eng
    eng.close()


def reference(model, tokenizer, question: str, **fields: object) -> str:  # type: ignore[no-untyped-def]
    """Greedy decoding with the fields applied as their definitions say (computed once per
    question and fields: every engine is checked against the same text)."""
    key = json.dumps(fields, sort_keys=True)
    return _reference(model, tokenizer, question, key)


@functools.cache
@torch.inference_mode()
def _reference(model, tokenizer, question: str, key: str) -> str:  # type: ignore[no-untyped-def]
    fields = {
        name: ({int(t): b for t, b in value.items()} if name == "logit_bias" else value)
        for name, value in json.loads(key).items()
    }
    prompt = encode_prompt(tokenizer, chat_job(question))
    stops = eos_ids(model, tokenizer)
    bias = fields.get("logit_bias", {})
    out: list[int] = []
    for _ in range(TOKENS):
        logits = model(torch.tensor([prompt + out])).logits[0, -1].double().tolist()
        for token, b in bias.items():  # type: ignore[attr-defined]
            logits[token] += b
        if len(out) < fields.get("min_tokens", 0):  # type: ignore[operator]
            for token in stops:
                logits[token] = float("-inf")
        rep = fields.get("repetition_penalty", 1.0)
        for token in set(prompt + out):
            logits[token] = logits[token] / rep if logits[token] > 0 else logits[token] * rep  # type: ignore[operator]
        for token in set(out):
            logits[token] -= fields.get("frequency_penalty", 0.0) * out.count(token)  # type: ignore[operator]
            logits[token] -= fields.get("presence_penalty", 0.0)  # type: ignore[operator]
        out.append(max(range(len(logits)), key=logits.__getitem__))
        if out[-1] in stops:
            break
    return tokenizer.decode(out, skip_special_tokens=True)  # type: ignore[no-any-return]


async def _text(engine, question: str, **fields: object) -> str:  # type: ignore[no-untyped-def]
    job = chat_job(question, **{"temperature": 0, "max_tokens": TOKENS, **fields})
    texts, _, _ = await collect(engine, job)
    return texts[0]


@pytest.mark.parametrize(
    "fields",
    [
        {"frequency_penalty": 1.0},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 1.6},
        {"frequency_penalty": 0.6, "presence_penalty": 0.6, "repetition_penalty": 1.2},
    ],
    ids=["frequency", "presence", "repetition", "all-three"],
)
async def test_penalties_follow_their_definition(engine, model_and_tokenizer, fields) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    plain, penalized = await asyncio.gather(_text(engine, REPEAT), _text(engine, REPEAT, **fields))
    assert penalized == reference(model, tokenizer, REPEAT, **fields)
    assert penalized != plain


async def test_logit_bias_bans_and_forces_tokens(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    plain = await _text(engine, SHORT)
    first = tokenizer(plain, add_special_tokens=False)["input_ids"][0]
    banned = await _text(engine, SHORT, logit_bias={first: -100.0})
    assert banned == reference(model, tokenizer, SHORT, logit_bias={first: -100.0})
    assert not banned.startswith(tokenizer.decode([first]))
    forced = await _text(engine, SHORT, logit_bias={first: 100.0}, ignore_eos=True)
    assert forced == tokenizer.decode([first]) * TOKENS


async def test_min_tokens_holds_eos_back(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = model_and_tokenizer
    plain = await collect(engine, chat_job(SHORT, temperature=0, max_tokens=TOKENS))
    assert plain[1][0] == "stop" and plain[2] < 10  # the answer is short
    job = chat_job(SHORT, temperature=0, max_tokens=TOKENS, min_tokens=10)
    texts, _, tokens = await collect(engine, job)
    assert tokens >= 10
    assert texts[0] == reference(model, tokenizer, SHORT, min_tokens=10)


async def test_min_p_one_keeps_only_the_likeliest_token(engine) -> None:  # type: ignore[no-untyped-def]
    plain = await _text(engine, REPEAT)
    hot = chat_job(REPEAT, temperature=1.5, min_p=1.0, max_tokens=TOKENS)
    assert (await collect(engine, hot))[0][0] == plain


async def test_stop_string_with_and_without_it_in_the_output(engine) -> None:  # type: ignore[no-untyped-def]
    plain = await _text(engine, REPEAT)
    stop = plain[12:15]
    cut = plain.index(stop)  # its first place
    without = await _text(engine, REPEAT, stop=[stop])
    with_it = await _text(engine, REPEAT, stop=[stop], include_stop_str_in_output=True)
    assert (without, with_it) == (plain[:cut], plain[: cut + len(stop)])


async def test_an_unknown_logit_bias_token_is_a_400(engine) -> None:  # type: ignore[no-untyped-def]
    from tokenrelay.workers.engine import InvalidRequest

    with pytest.raises(InvalidRequest, match="logit_bias"):
        await _text(engine, SHORT, logit_bias={10**7: 1.0})
    # the engine goes on (and has closed the refused job's stream before this one's)
    assert await _text(engine, SHORT, max_tokens=2)


async def test_each_choice_counts_its_own_tokens(engine, model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    if isinstance(engine, GenerateEngine):
        pytest.skip("the generate() baseline serves n=1 only")
    model, tokenizer = model_and_tokenizer
    fields = {"frequency_penalty": 1.0, "repetition_penalty": 1.2}
    job = chat_job(REPEAT, temperature=0, max_tokens=TOKENS, n=2, **fields)
    texts, _, _ = await collect(engine, job)
    assert texts == [reference(model, tokenizer, REPEAT, **fields)] * 2


async def test_a_preempted_sequence_keeps_its_counts(model_and_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A cache too small for all four: the newest are preempted and recomputed, and their
    penalties still count every token they had generated."""
    model, tokenizer = model_and_tokenizer
    small = PagedEngine(model, tokenizer, num_blocks=12, max_seqs=4, max_len=512)
    fields = {"frequency_penalty": 1.0, "presence_penalty": 0.5}
    try:
        jobs = [chat_job(REPEAT, temperature=0, max_tokens=40, **fields) for _ in range(4)]
        results = await asyncio.gather(*(collect(small, j) for j in jobs))
        assert small.preemptions > 0
        assert len({texts[0] for texts, _, _ in results}) == 1
        alone = PagedEngine(model, tokenizer, num_blocks=64, max_seqs=4, max_len=512)
        try:
            want = (await collect(alone, jobs[0]))[0][0]
        finally:
            alone.close()
        assert results[0][0][0] == want
        assert small.history._free and len(small.history._free) == small.history.counts.shape[0]
    finally:
        small.close()
