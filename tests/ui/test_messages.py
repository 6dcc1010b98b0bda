"""The UI's error messages and leaderboard maths, without a browser."""

from __future__ import annotations

import pytest

from tokenrelay.ui.arena import bradley_terry, leaderboard
from tokenrelay.ui.client import ApiError


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (401, "invalid_api_key", "The API key was refused"),
        (429, "overloaded", "The server is overloaded"),
        (429, "rate_limit_exceeded", "rate limit"),
        (503, "overloaded", "No model is ready"),
        (503, "queue_unavailable", "cannot reach Redis"),
        (404, "model_not_found", "not served"),
        (500, "worker_lost", "stopped in the middle"),
    ],
)
def test_errors_say_what_happened(status: int, code: str, words: str) -> None:
    text = ApiError(status, "the API's own words", code).readable()
    assert words in text and "the API's own words" in text and str(status) in text
    assert "network error" not in text.lower()


def vote(a: str, b: str, winner: str) -> dict[str, str]:
    return {"model_a": a, "model_b": b, "winner": winner}


def test_leaderboard_ranks_by_wins_and_ignores_self_play() -> None:
    votes = [vote("x", "y", "model_a")] * 3 + [vote("y", "z", "model_a"), vote("x", "x", "tie")]
    rows = leaderboard(votes)
    assert [r[1] for r in rows] == ["x", "y", "z"]
    assert rows[0][3:] == [3, 3, 0, 0]  # votes, wins, ties, losses (self-play left out)
    assert rows[1][3:] == [4, 1, 0, 3]


def test_bradley_terry_is_symmetric_and_finite() -> None:
    ratings = bradley_terry([vote("x", "y", "tie"), vote("y", "x", "tie (bothbad)")])
    assert ratings["x"] == pytest.approx(1000) and ratings["y"] == pytest.approx(1000)
    one_sided = bradley_terry([vote("x", "y", "model_a")] * 50)
    assert 1000 < one_sided["x"] < 2000
    assert bradley_terry([]) == {}
