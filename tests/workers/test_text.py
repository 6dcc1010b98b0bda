"""TextTracker against the real SmolLM2 tokenizer: incremental text equals a full decode,
and stop strings never leak, even split across tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tokenrelay.workers.text import TextTracker

SAMPLES = [
    "The capital of France is Paris.",
    "Ünïcödé: naïve café — 東京 and emoji 🙂🚀 mixed in.",
    "  leading spaces\nnew lines\n\n  and    gaps",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def tokenizer(demo_model: Path):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(demo_model)


def _run(tokenizer, text: str, stop: list[str]) -> tuple[str, TextTracker]:  # type: ignore[no-untyped-def]
    tracker = TextTracker(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop)
    out = ""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        out += tracker.add(token)
        if tracker.stopped:
            return out, tracker
    return out + tracker.flush(), tracker


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_text_equals_full_decode(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out, _ = _run(tokenizer, text, [])
    assert out == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["Paris"], "The capital of France is "),
        (["is Par"], "The capital of France "),
        (["."], "The capital of France is Paris"),
        (["nowhere", "France"], "The capital of "),
    ],
)
def test_stop_strings_cut_exactly(tokenizer, stop: list[str], expected: str) -> None:  # type: ignore[no-untyped-def]
    out, tracker = _run(tokenizer, "The capital of France is Paris.", stop)
    assert out == expected
    assert tracker.stopped


def test_partial_stop_is_held_back_then_released(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # "Par" could start the stop string "Parrot": it is held back, and released at the end.
    out, tracker = _run(tokenizer, "The capital of France is Paris.", ["Parrot"])
    assert out == "The capital of France is Paris."
    assert not tracker.stopped


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("size", [2, 4, 7])
def test_tokens_added_in_groups_give_the_same_text(tokenizer, text: str, size: int) -> None:  # type: ignore[no-untyped-def]
    # the paged engine adds a run of decode steps' tokens at once
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(lambda i: tokenizer.decode(i, skip_special_tokens=True), [])
    out = "".join(tracker.add_many(ids[i : i + size]) for i in range(0, len(ids), size))
    assert out + tracker.flush() == tokenizer.decode(ids, skip_special_tokens=True)
