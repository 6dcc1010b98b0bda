"""Per-request sampling: the request's logit adjustments (penalties.py), temperature,
min-p, top-k, top-p and a seeded generator; and the model's defaults for the sampling
fields a request leaves out."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from tokenrelay.queueing.messages import MODEL_DEFAULTED, SamplingParams

from .penalties import LogitAdjuster, TokenHistory

log = logging.getLogger(__name__)


def defaults_from(generation_config: Mapping[str, Any]) -> dict[str, float | int]:
    """The sampling defaults a model's generation_config sets, for the fields tokenrelay
    samples with (``MODEL_DEFAULTED``). A value tokenrelay would refuse from a client (a
    temperature of 5, say) is left out with a warning rather than applied. ``do_sample`` is
    not read, as vLLM does not: a config that names a temperature means it."""
    defaults: dict[str, float | int] = {}
    for name in MODEL_DEFAULTED:
        value = generation_config.get(name)
        if value is None:
            continue
        if name == "top_k" and isinstance(value, int) and value < 0:
            value = 0  # -1: no top-k filter, as 0 is here
        try:
            checked = SamplingParams.model_validate({name: value})
        except ValidationError:
            log.warning("generation_config %s=%r is out of range: not used", name, value)
            continue
        defaults[name] = getattr(checked, name)
    return defaults


def with_defaults(params: SamplingParams, defaults: Mapping[str, float | int]) -> SamplingParams:
    """``params`` with the model's defaults in the fields the request left out."""
    missing = {k: v for k, v in defaults.items() if k not in params.model_fields_set}
    return params.model_copy(update=missing) if missing else params


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids for a (rows, vocab) logits tensor (already adjusted, penalties.py);
    temperature 0 is greedy."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.min_p > 0:
        logits = _min_p(logits, torch.full((logits.shape[0],), params.min_p, device=logits.device))
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    params: list[SamplingParams | None],
    generators: list[torch.Generator | None],
    shared: torch.Generator,
    history: TokenHistory | None = None,
    rows: list[int | None] | None = None,
    stop_ids: list[Collection[int] | None] | None = None,
) -> torch.Tensor:
    """Sample one token per row of (rows, vocab) logits; see ``BatchSampler``."""
    sampler = BatchSampler(
        params, generators, shared, logits.device, history=history, rows=rows, stop_ids=stop_ids
    )
    return sampler(logits)


class BatchSampler:
    """Samples one token per row of (rows, vocab) logits in a few batched kernels.

    Each row has its own parameters (None = an idle row, taken greedily). Sampling is an
    exponential race, argmax(p / E) with E ~ Exp(1), which draws from p exactly; a row with
    its own generator (a request with a seed) draws its own E, so its tokens do not depend on
    what else is in the batch. The per-row parameters go to the device once, so a run of
    decode steps over the same rows pays for them once.

    A row's logit adjustments (penalties.py) come first: ``rows`` are the rows' places in
    ``history`` (None: not tracked) and ``stop_ids`` the ids ``min_tokens`` holds back.
    """

    def __init__(
        self,
        params: list[SamplingParams | None],
        generators: list[torch.Generator | None],
        shared: torch.Generator,
        device: torch.device,
        *,
        host: bool | None = None,
        history: TokenHistory | None = None,
        rows: list[int | None] | None = None,
        stop_ids: list[Collection[int] | None] | None = None,
    ) -> None:
        self.adjust = LogitAdjuster.build(params, device, history, rows, stop_ids)
        live = [p for p in params if p is not None and p.temperature > 0]
        self.greedy_only = not live
        self.shared = shared
        self.seeded = [(row, g) for row, g in enumerate(generators) if g is not None]
        self.filtered = any(p.top_k > 0 or p.top_p < 1.0 for p in live)
        # on a CPU there is no device queue to keep ahead of, so choices that depend on the
        # values (host_sampling.py) cost nothing, and they spare a sort of the vocabulary
        self.host = device.type == "cpu" if host is None else host
        if self.greedy_only:
            return
        self.temps = _on(device, [p.temperature if p else 0.0 for p in params])
        self.min_p = None
        if any(p.min_p > 0 for p in live):
            self.min_p = _on(device, [p.min_p if p else 0.0 for p in params])
        if self.filtered:
            self.top_k = _on(device, [p.top_k if p and p.top_k > 0 else 1 << 30 for p in params])
            self.top_p = _on(device, [p.top_p if p else 1.0 for p in params])
            self.max_top_k = max((p.top_k for p in live), default=0)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.adjust is None:
            return self._pick(logits)
        picked = self._pick(self.adjust(logits))
        self.adjust.record(picked)
        return picked

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        greedy = logits.argmax(dim=-1)
        if self.greedy_only:
            return greedy
        scaled = logits.float() / self.temps.clamp(min=1e-5)[:, None]
        if self.min_p is not None:
            scaled = _min_p(scaled, self.min_p)
        if self.host:
            from .host_sampling import sample_on_host

            return torch.where(self.temps > 0, sample_on_host(self, scaled), greedy)
        if self.filtered:
            scaled, order = self._filter(scaled)
        noise = torch.empty_like(scaled).exponential_(generator=self.shared)
        for row, generator in self.seeded:
            noise[row].exponential_(generator=generator)
        picked = (torch.softmax(scaled, dim=-1) / noise).argmax(dim=-1)
        if self.filtered:
            picked = order.gather(-1, picked[:, None])[:, 0]
        return torch.where(self.temps > 0, picked, greedy)

    def _filter(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k and top-p per row, on the logits sorted in descending order."""
        ordered, order = torch.sort(scaled, descending=True, dim=-1)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None]
        ordered = ordered.masked_fill(rank >= self.top_k[:, None], float("-inf"))
        probs = torch.softmax(ordered, dim=-1)
        drop = probs.cumsum(-1) - probs >= self.top_p[:, None]
        return ordered.masked_fill(drop, float("-inf")), order


def _min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop the tokens less likely than min_p x the likeliest (vLLM's min-p, on the
    temperature-scaled logits): p < min_p x p_max is logit < max + log(min_p)."""
    floor = scaled.amax(dim=-1, keepdim=True) + torch.log(min_p).reshape(-1, 1)
    return scaled.masked_fill(scaled < floor, float("-inf"))


def _on(device: torch.device, values: list[float] | list[int]) -> torch.Tensor:
    """Copy per-row values to the device without waiting for the device's queue."""
    return torch.tensor(values).to(device, non_blocking=True)
