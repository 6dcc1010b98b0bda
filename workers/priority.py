"""Inside an engine, Batch API lines (``JobHandle.background``) go after interactive jobs.

Every engine admits interactive jobs first. On a CPU a decode step's cost grows with its
sequences and a prefill holds up every sequence's next step, so there the rule is stricter
(``strict``):

- while an interactive job runs or waits, batch lines sit out the decode steps (resuming
  from their last token afterwards) and none is admitted;
- a batch line is admitted only once no interactive job has run or waited for ``HOLD_S``
  seconds, one a pass: interactive requests come in runs (a user's next message, a
  client's next call), and a burst of batch prefills admitted the moment one ends is what
  the next one would wait behind;
- so the next interactive arrival waits for one decode step of the lines at most.

On a GPU a few more sequences in a step cost about nothing, so lines ride along there.
"""

from __future__ import annotations

import time

HOLD_S = 1.0  # seconds without interactive work before a CPU engine admits a batch line
HELD_POLL_S = 0.05  # an engine holding only batch lines back looks again this often


class Priority:
    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self._interactive_at = float("-inf")

    def admits_background(self, interactive: bool, admitted: int) -> bool:
        """Whether a batch line may be admitted now; ``interactive``: an interactive job
        runs or waits; ``admitted``: batch lines admitted in this pass so far."""
        if not self.strict:
            return True
        now = time.monotonic()
        if interactive:
            self._interactive_at = now
            return False
        return admitted == 0 and now - self._interactive_at >= HOLD_S

    def pauses_background(self, interactive: bool) -> bool:
        """Whether batch lines sit out this decode step (an interactive sequence is in it)."""
        if self.strict and interactive:
            self._interactive_at = time.monotonic()
            return True
        return False
