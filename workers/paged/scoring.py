"""Log probabilities in the paged engine (workers/logprobs.py): the rows of a launched
run of steps whose jobs ask are scored as each step samples, on the device, and read with
the step's tokens; a prompt to score (echo) is prefilled with the logits of every position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenrelay.queueing.messages import TokenLogprob

from ..logprobs import Namer, Scored
from .runner import to_device
from .sequences import Run, Seq


class StepScores:
    """The scores of some rows (``rows``, each with its top count) at each launched step."""

    def __init__(self, rows: list[int], ks: list[int]) -> None:
        self.rows, self.ks = rows, ks
        self.steps: list[Scored] = []

    @staticmethod
    def asked(live: list[tuple[Run, Seq]]) -> StepScores | None:
        want = [(i, r.job.params.logprobs) for i, (r, _) in enumerate(live)]
        want = [(i, k) for i, k in want if k is not None]
        if not want:
            return None
        return StepScores([i for i, _ in want], [k or 0 for _, k in want])

    def wrap(self, sample: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``sample``, scoring this object's rows of each step's raw logits as it goes."""

        def scored(logits: torch.Tensor) -> torch.Tensor:
            picked = sample(logits)
            self.add(logits, picked)
            return picked

        return scored

    def add(self, logits: torch.Tensor, picked: torch.Tensor) -> None:
        index = to_device(logits.device, self.rows)
        self.steps.append(Scored(logits[index], picked[index], max(self.ks)))

    def entries(self, namer: Namer) -> dict[int, list[TokenLogprob]]:
        """Per scored row, its token's entry at each step."""
        out: dict[int, list[TokenLogprob]] = {row: [] for row in self.rows}
        for scored in self.steps:
            for row, k, (token, lp, top) in zip(self.rows, self.ks, scored.rows(), strict=True):
                out[row].append(namer.entry(token, lp, top[:k]))
        return out
