"""A worker's generation rate: completion tokens counted as they are made, reported as a
rate over a sliding window by each heartbeat."""

from __future__ import annotations

import time
from collections import deque


class Throughput:
    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.total = 0
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])

    def count(self, completion_tokens: int, counted: int) -> int:
        """Add a job's tokens made since ``counted`` (its running total); returns the new
        running total, to pass back next time."""
        self.total += max(0, completion_tokens - counted)
        return max(completion_tokens, counted)

    def rate(self) -> float:
        """Tokens per second over the last ``window`` seconds (or since the start)."""
        now = time.monotonic()
        self._samples.append((now, self.total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return round((self.total - n0) / (now - t0), 2) if now > t0 else 0.0
