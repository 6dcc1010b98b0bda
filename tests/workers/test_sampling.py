"""The batch sampler draws from the distribution a request asked for: temperature, top-k
and top-p, on the device path (sort and exponential race) and the host path (candidates
and inverse CDF) alike, and a seeded row's tokens do not depend on the rest of the batch."""

from __future__ import annotations

import pytest
import torch

from tokenrelay.queueing.messages import SamplingParams
from tokenrelay.workers import host_sampling
from tokenrelay.workers.sampling import BatchSampler

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
DRAWS = 20_000


def _frequencies(params: SamplingParams, host: bool, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sampler = BatchSampler([params] * DRAWS, [None] * DRAWS, gen, torch.device("cpu"), host=host)
    picked = sampler(logits.expand(DRAWS, -1).clone())
    return torch.bincount(picked, minlength=logits.shape[0]).double() / DRAWS


def _expected(keep: list[int], temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(LOGITS.double() / temperature, dim=0)
    mask = torch.zeros_like(p)
    mask[keep] = 1
    return p * mask / (p * mask).sum()


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
@pytest.mark.parametrize(
    ("params", "keep", "temperature"),
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3], 1.0),
        (SamplingParams(temperature=0.5), [0, 1, 2, 3], 0.5),
        (SamplingParams(temperature=1.0, top_k=2), [0, 1], 1.0),
        # the mass before token 2 is 0.8: top_p 0.8 keeps two tokens, 0.81 three
        (SamplingParams(temperature=1.0, top_p=0.8), [0, 1], 1.0),
        (SamplingParams(temperature=1.0, top_p=0.81), [0, 1, 2], 1.0),
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.5 / 0.95 + 0.01), [0, 1], 1.0),
    ],
)
def test_draws_follow_the_filtered_distribution(
    host: bool, params: SamplingParams, keep: list[int], temperature: float
) -> None:
    got = _frequencies(params, host)
    want = _expected(keep, temperature)
    assert (got - want).abs().max() < 0.015, (got.tolist(), want.tolist())


def test_host_path_sorts_a_row_flatter_than_its_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-p 0.9 of a nearly flat distribution needs more tokens than the candidates hold:
    the row is sorted in full and still gets exactly its nucleus."""
    monkeypatch.setattr(host_sampling, "CANDIDATES", 2)
    got = _frequencies(SamplingParams(temperature=1.0, top_p=0.81), host=True)
    assert (got - _expected([0, 1, 2])).abs().max() < 0.015


def test_mixed_rows_each_get_their_own_rule() -> None:
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0),
        None,
    ]
    gen = torch.Generator().manual_seed(1)
    logits = LOGITS.expand(4, -1).clone()
    for host in (True, False):
        picked = BatchSampler(rows, [None] * 4, gen, torch.device("cpu"), host=host)(logits)
        assert picked[0] == 0 and picked[1] == 0 and picked[3] == 0  # greedy, top-1, idle


@pytest.mark.parametrize("host", [True, False], ids=["host", "device"])
def test_a_seeded_row_does_not_depend_on_the_batch(host: bool) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))

    def tokens(others: list[SamplingParams]) -> list[int]:
        out = []
        for _ in range(10):
            gen = torch.Generator().manual_seed(len(out))
            own = torch.Generator().manual_seed(7 + len(out))
            sampler = BatchSampler(
                [seeded, *others], [own, None, None], gen, torch.device("cpu"), host=host
            )
            out.append(int(sampler(logits)[0]))
        return out

    alone = tokens([SamplingParams(temperature=0), SamplingParams(temperature=0)])
    shared = tokens([SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5)])
    assert alone == shared
