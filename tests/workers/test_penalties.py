"""The logit adjustments (workers/penalties.py) and min-p against hand-computed values on
crafted logits: each field alone, several rows each with their own, greedy sequences over
several steps (the history counts what the sampler picked), and a batch without them
building nothing."""

from __future__ import annotations

import pytest
import torch

from tokenrelay.queueing.messages import SamplingParams
from tokenrelay.workers.engine import InvalidRequest
from tokenrelay.workers.penalties import LogitAdjuster, TokenHistory, check_logit_bias
from tokenrelay.workers.sampling import BatchSampler

CPU = torch.device("cpu")
GREEDY = {"temperature": 0.0}


def _history_with(prompt: list[int], generated: list[int], vocab: int = 4) -> tuple:
    history = TokenHistory(vocab, CPU, rows=1)
    row = history.acquire(prompt)
    for token in generated:
        history.counts[row, token] += 1
        history.generated[row] += 1
    return history, row


def _adjusted(params: SamplingParams, logits: list[float], prompt=(), generated=()) -> list:
    history, row = _history_with(list(prompt), list(generated))
    adjust = LogitAdjuster.build([params], CPU, history, [row], [{3}])
    assert adjust is not None
    return adjust(torch.tensor([logits])).tolist()[0]


def test_logit_bias_is_added_to_the_named_tokens() -> None:
    params = SamplingParams(logit_bias={0: 5.0, 2: -100.0})
    assert _adjusted(params, [1.0, 2.0, 3.0, 0.0]) == [6.0, 2.0, -97.0, 0.0]


def test_frequency_and_presence_count_the_generated_tokens_only() -> None:
    # generated: token 1 once, token 2 twice; token 0 is in the prompt, which they ignore
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    got = _adjusted(params, [1.0, 2.0, 3.0, 0.5], prompt=[0], generated=[2, 1, 2])
    assert got == [1.0, 2.0 - 0.5 - 0.25, 3.0 - 2 * 0.5 - 0.25, 0.5]


def test_negative_penalties_favour_repeats() -> None:
    params = SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5)
    assert _adjusted(params, [1.0, 1.0, 1.0, 1.0], generated=[1, 1]) == [1.0, 3.5, 1.0, 1.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    # seen: 2 and 3 in the prompt, 1 generated; 0 never
    params = SamplingParams(repetition_penalty=2.0)
    got = _adjusted(params, [1.0, 2.0, -1.0, 0.5], prompt=[2, 3], generated=[1])
    assert got == [1.0, 1.0, -2.0, 0.25]


def test_min_tokens_masks_the_stop_ids_until_reached() -> None:
    params = SamplingParams(min_tokens=2)
    assert _adjusted(params, [1.0, 2.0, 3.0, 9.0], generated=[1]) == [1.0, 2.0, 3.0, -torch.inf]
    assert _adjusted(params, [1.0, 2.0, 3.0, 9.0], generated=[1, 1]) == [1.0, 2.0, 3.0, 9.0]


def test_the_caller_logits_are_not_changed() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    adjust = LogitAdjuster.build([SamplingParams(logit_bias={0: 1.0})], CPU)
    assert adjust is not None
    adjust(logits)
    assert logits.tolist() == [[1.0, 2.0, 3.0, 0.0]]


def _greedy_run(params: SamplingParams, logits: list[float], steps: int, stop=()) -> list[int]:
    """Greedy tokens over ``steps`` steps of the same logits, through BatchSampler."""
    history = TokenHistory(len(logits), CPU, rows=1)
    row = history.acquire([])
    out = []
    for _ in range(steps):
        sampler = BatchSampler(
            [params], [None], torch.Generator(), CPU, history=history, rows=[row], stop_ids=[stop]
        )
        out.append(int(sampler(torch.tensor([logits]))[0]))
    return out


@pytest.mark.parametrize(
    ("field", "want"),
    [
        # frequency 1: 3.0 -> 2.0 after one pick, so 2.4 wins; then 2.0 > 1.4; ...
        ({"frequency_penalty": 1.0}, [0, 1, 0, 2, 1]),
        # presence 1: each token pays once: after 0 and 1 have been picked, 0 stays ahead
        ({"presence_penalty": 1.0}, [0, 1, 0, 0, 0]),
        # repetition 2: 3.0 -> 1.5 once seen, 2.4 -> 1.2, 1.9 -> 0.95
        ({"repetition_penalty": 2.0}, [0, 1, 2, 0, 0]),
        ({}, [0, 0, 0, 0, 0]),
    ],
)
def test_greedy_sequences_follow_the_penalties(field: dict, want: list[int]) -> None:
    assert _greedy_run(SamplingParams(**GREEDY, **field), [3.0, 2.4, 1.9], 5) == want


def test_min_tokens_then_the_stop_token() -> None:
    params = SamplingParams(**GREEDY, min_tokens=2)
    assert _greedy_run(params, [1.0, 2.0, 5.0], 4, stop={2}) == [1, 1, 2, 2]


def test_rows_each_get_their_own_adjustments() -> None:
    """One batch: a frequency row, a plain row, a repetition row, a biased row, an idle row."""
    history = TokenHistory(3, CPU, rows=1)  # grows to fit two tracked rows
    a, b = history.acquire([]), history.acquire([2])
    history.counts[a, 0] = 2
    params = [
        SamplingParams(frequency_penalty=1.0),
        SamplingParams(),
        SamplingParams(repetition_penalty=4.0),
        SamplingParams(logit_bias={1: 0.5}),
        None,
    ]
    adjust = LogitAdjuster.build(params, CPU, history, [a, None, b, None, None])
    assert adjust is not None
    logits = torch.tensor([[3.0, 2.0, 1.0]] * 5)
    assert adjust(logits).tolist() == [
        [1.0, 2.0, 1.0],
        [3.0, 2.0, 1.0],
        [3.0, 2.0, 0.25],
        [3.0, 2.5, 1.0],
        [3.0, 2.0, 1.0],
    ]
    adjust.record(torch.tensor([1, 0, 1, 0, 0]))
    assert history.counts[a].tolist() == [2, 1, 0] and history.counts[b].tolist() == [0, 1, 0]
    assert history.generated[[a, b]].tolist() == [1, 1]


def test_a_batch_without_adjustments_builds_nothing() -> None:
    rows = [SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1), None]
    assert LogitAdjuster.build(rows, CPU) is None
    assert BatchSampler(rows, [None, None], torch.Generator(), CPU).adjust is None


def test_forked_rows_share_history_and_released_rows_come_back_clean() -> None:
    history = TokenHistory(4, CPU, rows=1)
    row = history.acquire([3])
    history.counts[row, 1] = 2
    history.generated[row] = 2
    twin = history.fork(row)
    assert history.counts[twin].tolist() == [0, 2, 0, 0] and history.prompt[twin, 3]
    history.release(twin)
    again = history.acquire([])
    assert history.counts[again].sum() == 0 and not history.prompt[again].any()
    assert history.generated[again] == 0


def test_logit_bias_ids_must_be_in_the_vocabulary() -> None:
    check_logit_bias(SamplingParams(logit_bias={3: 1.0}), vocab=4)
    with pytest.raises(InvalidRequest, match="Maximum value is 3"):
        check_logit_bias(SamplingParams(logit_bias={4: 1.0}), vocab=4)


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize(
    ("min_p", "keep"),
    [(0.35, [0, 1]), (0.2, [0, 1, 2]), (0.0, [0, 1, 2, 3])],  # the floor is min_p x 0.5
)
def test_min_p_keeps_tokens_at_least_min_p_of_the_likeliest(
    host: bool, min_p: float, keep: list[int]
) -> None:
    draws = 20_000
    params = SamplingParams(temperature=1.0, min_p=min_p)
    sampler = BatchSampler(
        [params] * draws, [None] * draws, torch.Generator().manual_seed(0), CPU, host=host
    )
    got = torch.bincount(sampler(LOGITS.expand(draws, -1).clone()), minlength=4).double() / draws
    p = torch.exp(LOGITS.double())
    want = torch.zeros(4, dtype=torch.double)
    want[keep] = p[keep] / p[keep].sum()
    assert (got - want).abs().max() < 0.015, (got.tolist(), want.tolist())


@pytest.mark.gpu
def test_on_cuda_the_same_tokens_as_on_the_cpu() -> None:
    """Greedy rows with every adjustment, several steps, each row's own: the device path
    on CUDA (bfloat16 logits, as a model gives) picks what the CPU picks."""
    vocab, steps = 1000, 12
    params = [
        SamplingParams(**GREEDY, frequency_penalty=0.7),
        SamplingParams(**GREEDY, presence_penalty=1.2, logit_bias={5: 3.0}),
        SamplingParams(**GREEDY, repetition_penalty=1.5, min_tokens=4),
        SamplingParams(**GREEDY),
        None,
    ]
    base = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(3)) * 2
    base = base.bfloat16().float()  # exactly representable on both sides

    def run(device: torch.device) -> list[list[int]]:
        history = TokenHistory(vocab, device, rows=1)
        rows = [history.acquire([1, 2, 3]) if p and p != params[3] else None for p in params]
        out = []
        for _ in range(steps):
            sampler = BatchSampler(
                params,
                [None] * len(params),
                torch.Generator(device=device),
                device,
                history=history,
                rows=rows,
                stop_ids=[{int(base[2].argmax())}] * len(params),
            )
            out.append(sampler(base.to(device, torch.bfloat16)).tolist())
        return out

    assert run(torch.device("cuda")) == run(CPU)


def test_the_one_request_sampler_applies_min_p() -> None:
    """sample() (the hf engine's): min_p 0.35 of LOGITS keeps tokens 0 and 1 only."""
    from tokenrelay.workers.sampling import sample

    gen = torch.Generator().manual_seed(0)
    picked = sample(LOGITS.expand(4000, -1), SamplingParams(temperature=1.0, min_p=0.35), gen)
    assert set(picked.tolist()) == {0, 1}
