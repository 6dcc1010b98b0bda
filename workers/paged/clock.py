"""Where the engine thread's time goes, per decode step: admitting (prefill included),
launching the step, waiting for the device, and turning tokens into text. The benchmark
prints it; a host that is busier than the device shows here first."""

from __future__ import annotations

import time
from collections import defaultdict


class LoopClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._mark = time.perf_counter()

    def start(self) -> None:
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now

    def report(self) -> dict[str, float]:
        """Milliseconds per decode step in each phase; resets the clock."""
        steps = max(self.steps, 1)
        out = {phase: round(s * 1e3 / steps, 3) for phase, s in sorted(self.seconds.items())}
        out["steps"] = self.steps
        self.seconds.clear()
        self.steps = 0
        return out
