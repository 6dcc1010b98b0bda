"""Per-request timings and their summary: throughput, TTFT, inter-token latency, end to end."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Record:
    start: float
    first: float | None = None  # first content token arrived
    end: float | None = None
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # between content events
    error: str | None = None
    prompt_len: int = 0  # the prompt tokens asked for
    prompt_tokens: int | None = None  # those the server counted (None: it did not say)


def prompt_mismatches(records: list[Record]) -> list[str]:
    """The requests whose prompt the server counted otherwise than the bench asked."""
    return [
        f"asked {r.prompt_len} prompt tokens, the server counted {r.prompt_tokens}"
        for r in records
        if r.error is None and r.prompt_tokens is not None and r.prompt_tokens != r.prompt_len
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summarize(records: list[Record], label: str, concurrency: int) -> dict[str, object]:
    ok = [r for r in records if r.error is None and r.end is not None and r.first is not None]
    wall = max((r.end or 0) for r in records) - min(r.start for r in records) if records else 0
    tokens = sum(r.tokens for r in ok)
    ttft = [(r.first or 0) - r.start for r in ok]
    # inter-token latency per request: decode time over the tokens after the first
    itl = [((r.end or 0) - (r.first or 0)) / (r.tokens - 1) for r in ok if r.tokens > 1]
    e2e = [(r.end or 0) - r.start for r in ok]
    return {
        "mode": label,
        "concurrency": concurrency,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1) if wall else 0.0,
        "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 1),
        "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 1),
        "itl_p50_ms": round(pct(itl, 0.5) * 1000, 2),
        "itl_p99_ms": round(pct(itl, 0.99) * 1000, 2),
        "e2e_p50_s": round(pct(e2e, 0.5), 2),
        "e2e_p99_s": round(pct(e2e, 0.99), 2),
    }


COLUMNS = [
    "model",
    "mode",
    "concurrency",
    "requests",
    "errors",
    "tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "e2e_p50_s",
    "e2e_p99_s",
    "roofline_tok_s",
]


def markdown(rows: list[dict[str, object]]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
