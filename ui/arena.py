"""Arena votes: where they are kept, how they are exported, the leaderboard made from them.

Each vote is one entry of the ``Keys.ui_votes`` stream (field ``vote``: JSON with both
models, the winner and both conversations), so the votes and the conversations they judged
stay together and export as one JSONL line each. The stream is never trimmed: votes are
data. Without a Redis URL the votes live in memory, for a quick local try.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenrelay.queueing.connection import RedisSettings, connect

WINNERS = {
    "a": "model_a",
    "b": "model_b",
    "tie": "tie",
    "bothbad": "tie (bothbad)",
}


@dataclass
class Vote:
    mode: str  # "battle" (names hidden until the vote) or "named"
    model_a: str
    model_b: str
    winner: str  # one of WINNERS' values
    conversation_a: list[dict[str, str]]
    conversation_b: list[dict[str, str]]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tstamp: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class VoteStore:
    """Votes in Redis (``redis_url``) or, without one, in this process's memory."""

    def __init__(self, redis_url: str | None, prefix: str = "tr") -> None:
        self.settings = RedisSettings(url=redis_url or "", prefix=prefix, max_connections=8)
        self.redis = connect(self.settings) if redis_url else None
        self.memory: list[str] = []

    @property
    def where(self) -> str:
        return f"Redis stream `{self.settings.keys.ui_votes}`" if self.redis else "memory"

    async def add(self, vote: Vote) -> None:
        if self.redis is None:
            self.memory.append(vote.to_json())
        else:
            await self.redis.xadd(self.settings.keys.ui_votes, {"vote": vote.to_json()})

    async def all(self) -> list[dict[str, Any]]:
        """Every vote, oldest first."""
        if self.redis is None:
            return [json.loads(v) for v in self.memory]
        votes, start = [], "-"
        while True:
            page = await self.redis.xrange(self.settings.keys.ui_votes, start, "+", count=1000)
            votes += [json.loads(fields["vote"]) for _, fields in page]
            if len(page) < 1000:
                return votes
            start = "(" + page[-1][0]

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()


async def export_jsonl(redis_url: str, prefix: str, path: str) -> int:
    """Write every vote to ``path``, one JSON object a line; return how many."""
    store = VoteStore(redis_url, prefix)
    try:
        votes = await store.all()
    finally:
        await store.close()
    with open(path, "w", encoding="utf-8") as out:
        for vote in votes:
            out.write(json.dumps(vote, ensure_ascii=False) + "\n")
    return len(votes)


def bradley_terry(votes: list[dict[str, Any]], iterations: int = 200) -> dict[str, float]:
    """Bradley-Terry strengths on the Elo scale (1000 = the geometric mean model).

    Fitted with Hunter's MM updates; a tie (or "both bad") is half a win for each side.
    Each pair that met also gets one virtual tie, so a model that won every vote gets a
    high but finite rating. Order-independent, unlike online Elo.
    """
    wins: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for vote in votes:
        a, b = vote["model_a"], vote["model_b"]
        if a == b:
            continue  # a model against itself says nothing about its rank
        if b not in wins[a]:  # the pair's virtual tie
            wins[a][b] += 0.5
            wins[b][a] += 0.5
        score = {"model_a": 1.0, "model_b": 0.0}.get(vote["winner"], 0.5)
        wins[a][b] += score
        wins[b][a] += 1 - score
    models = sorted(wins)
    if not models:
        return {}
    strength = dict.fromkeys(models, 1.0)
    for _ in range(iterations):
        for m in models:
            games = sum((wins[m][o] + wins[o][m]) / (strength[m] + strength[o]) for o in wins[m])
            strength[m] = sum(wins[m].values()) / games
        mean = math.exp(sum(math.log(s) for s in strength.values()) / len(strength))
        strength = {m: s / mean for m, s in strength.items()}
    return {m: 1000 + 400 * math.log10(s) for m, s in strength.items()}


def leaderboard(votes: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of rank, model, rating, votes, wins, ties, losses; best first."""
    ratings = bradley_terry(votes)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for vote in votes:
        a, b = vote["model_a"], vote["model_b"]
        if a == b:
            continue
        column = {"model_a": (0, 2), "model_b": (2, 0)}.get(vote["winner"], (1, 1))
        tally[a][column[0]] += 1
        tally[b][column[1]] += 1
    ranked = sorted(ratings, key=lambda m: -ratings[m])
    return [
        [rank, m, round(ratings[m]), sum(tally[m]), *tally[m]] for rank, m in enumerate(ranked, 1)
    ]


LEADERBOARD_HEADERS = ["Rank", "Model", "Rating", "Votes", "Wins", "Ties", "Losses"]
