"""Logit adjustments a request asks for, applied before temperature, in vLLM's order:

1. ``logit_bias``: each named token's logit plus its bias;
2. ``min_tokens``: the stop token ids and EOS at -inf while a choice has generated fewer;
3. ``repetition_penalty`` (HF's and vLLM's): a token in the prompt or generated so far has
   its logit divided by the penalty when positive, multiplied by it otherwise;
4. ``frequency_penalty`` and ``presence_penalty`` (OpenAI's): minus penalty x the token's
   count among the tokens generated so far, and minus penalty x [count > 0].

Greedy rows get them too (the argmax of the adjusted logits). What a sequence generated
lives on the device (``TokenHistory``), updated by the sampler as it picks, so a run of
decode steps launched back to back, before the host has read their tokens, still sees
every one of them. Only rows that ask for a penalty or ``min_tokens`` take a history row,
and a batch whose rows ask for none of these builds nothing (``LogitAdjuster.build``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from tokenrelay.queueing.messages import SamplingParams

from .engine import InvalidRequest


def needs_history(p: SamplingParams) -> bool:
    """Whether a request's choices need their generated tokens counted on the device."""
    return (
        p.presence_penalty != 0
        or p.frequency_penalty != 0
        or p.repetition_penalty != 1
        or p.min_tokens > 0
    )


def check_logit_bias(p: SamplingParams, vocab: int) -> None:
    """The worker's half of OpenAI's logit_bias check: the ids must be in the vocabulary."""
    over = [t for t in p.logit_bias if t >= vocab]
    if over:
        raise InvalidRequest(
            f"Invalid key in 'logit_bias': {over[0]}. Maximum value is {vocab - 1}.",
            code="invalid_value",
            param="logit_bias",
        )


class TokenHistory:
    """Per-sequence token counts on the device: one row a sequence that needs them, taken
    and given back like a cache slot. ``counts`` (rows, vocab) are the generated tokens'
    counts, ``prompt`` marks the prompt's tokens (for the repetition penalty) and
    ``generated`` is each row's number of tokens (for ``min_tokens``). Rows grow by
    doubling when none is free."""

    def __init__(self, vocab: int, device: torch.device, rows: int = 4) -> None:
        self.vocab = vocab
        self.device = device
        self.counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.generated = torch.zeros(rows, dtype=torch.int32, device=device)
        self._free = list(range(rows))

    def acquire(self, prompt_ids: Sequence[int]) -> int:
        """A zeroed row whose prompt mask holds ``prompt_ids``."""
        row = self._take()
        self.prompt[row].zero_()
        if prompt_ids:
            ids = torch.tensor(list(prompt_ids), dtype=torch.long).clamp_(0, self.vocab - 1)
            self.prompt[row, ids.to(self.device, non_blocking=True)] = True
        return row

    def fork(self, row: int) -> int:
        """A row with the same history as ``row`` (another choice of the same prompt)."""
        new = self._take()
        self.prompt[new] = self.prompt[row]
        self.counts[new] = self.counts[row]
        self.generated[new] = self.generated[row]
        return new

    def release(self, row: int) -> None:
        self._free.append(row)

    def _take(self) -> int:
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.counts[row].zero_()
        self.generated[row] = 0
        return row

    def _grow(self) -> None:
        rows = self.counts.shape[0]
        self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
        self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
        self.generated = torch.cat([self.generated, torch.zeros_like(self.generated)])
        self._free.extend(range(2 * rows - 1, rows - 1, -1))


class LogitAdjuster:
    """The adjustments of one batch's rows, their parameters on the device once; call it
    on (rows, vocab) logits, then ``record`` the tokens picked from them."""

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams | None],
        device: torch.device,
        history: TokenHistory | None = None,
        rows: Sequence[int | None] | None = None,
        stop_ids: Sequence[Collection[int] | None] | None = None,
    ) -> LogitAdjuster | None:
        """None when no row asks for an adjustment: such a batch pays nothing."""
        if not any(p is not None and (p.logit_bias or needs_history(p)) for p in params):
            return None
        return cls(params, device, history, rows, stop_ids)

    def __init__(
        self,
        params: Sequence[SamplingParams | None],
        device: torch.device,
        history: TokenHistory | None,
        rows: Sequence[int | None] | None,
        stop_ids: Sequence[Collection[int] | None] | None,
    ) -> None:
        self.history = history
        biased = [(b, t, v) for b, p in enumerate(params) if p for t, v in p.logit_bias.items()]
        self.bias = None
        if biased:
            r, t, v = zip(*biased, strict=True)
            self.bias = (_on(device, r), _on(device, t), _on(device, v, torch.float32))
        tracked = [
            (b, p, rows[b])
            for b, p in enumerate(params)
            if p is not None and needs_history(p) and rows is not None and rows[b] is not None
        ]
        self.tracked = bool(tracked) and history is not None
        if not self.tracked:
            return
        self.batch_rows = _on(device, [b for b, _, _ in tracked])
        self.pool_rows = _on(device, [h for _, _, h in tracked])
        self.ones = torch.ones(len(tracked), dtype=torch.int32, device=device)
        ps = [p for _, p, _ in tracked]
        self.repetition = any(p.repetition_penalty != 1 for p in ps)
        self.additive = any(p.presence_penalty or p.frequency_penalty for p in ps)
        self.rep = _on(device, [p.repetition_penalty for p in ps], torch.float32)
        self.freq = _on(device, [p.frequency_penalty for p in ps], torch.float32)
        self.pres = _on(device, [p.presence_penalty for p in ps], torch.float32)
        stops = [
            (i, t)
            for i, (b, p, _) in enumerate(tracked)
            if p.min_tokens > 0
            for t in sorted((stop_ids[b] if stop_ids else None) or ())
        ]
        self.stops = None
        if stops:
            local, ids = zip(*stops, strict=True)
            self.stops = (_on(device, local), _on(device, ids))
            self.min_tokens = _on(device, [p.min_tokens for p in ps], torch.int32)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits.to(torch.float32, copy=True)
        if self.bias is not None:
            r, t, v = self.bias
            out.index_put_((r, t), v, accumulate=True)
        if not self.tracked:
            return out
        assert self.history is not None
        sub = out[self.batch_rows]
        counts = self.history.counts[self.pool_rows]
        if self.stops is not None:
            local, ids = self.stops
            early = self.history.generated[self.pool_rows] < self.min_tokens
            sub[local, ids] = torch.where(early[local], float("-inf"), sub[local, ids])
        if self.repetition:
            seen = self.history.prompt[self.pool_rows] | (counts > 0)
            rep = self.rep[:, None]
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        if self.additive:
            sub = sub - self.freq[:, None] * counts - self.pres[:, None] * (counts > 0)
        return out.index_copy_(0, self.batch_rows, sub)

    def record(self, picked: torch.Tensor) -> None:
        """Count the tokens picked for the tracked rows."""
        if not self.tracked:
            return
        assert self.history is not None
        tokens = picked[self.batch_rows]
        self.history.counts.index_put_((self.pool_rows, tokens), self.ones, accumulate=True)
        self.history.generated.index_add_(0, self.pool_rows, self.ones)


def _on(
    device: torch.device, values: Sequence[float], dtype: torch.dtype = torch.long
) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype).to(device, non_blocking=True)
