"""Incremental detokenization with stop strings that never leak."""

from __future__ import annotations

from collections.abc import Callable


class TextTracker:
    """Turns one sequence's token ids into safe-to-send text deltas.

    Text that could still become a stop string, or an incomplete UTF-8 character, is held
    back until the next token settles it. ``include_stop`` (vLLM's
    include_stop_str_in_output) ends the text after the stop string instead of before it;
    stop strings are looked for only once more than ``min_tokens`` tokens are in (vLLM's
    rule: min_tokens holds back every way of stopping).
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: list[str],
        include_stop: bool = False,
        min_tokens: int = 0,
    ) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        self.token_ids: list[int] = []
        self.text = ""  # the decoded text so far
        self.sent = 0  # characters of ``text`` already emitted
        self.stopped = False
        # Only a short window of tokens is decoded per step (as vLLM does): ids from
        # ``_prefix`` to ``_read`` are already in ``text``, those before ``_prefix`` are
        # settled. Decoding from ``_prefix`` keeps word-boundary spaces right.
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Add a token; returns the new text that is safe to send (maybe empty)."""
        return self.add_many([token_id])

    def add_many(self, token_ids: list[int]) -> str:
        """Add several tokens at once (one decode for all of them); returns the new text
        that is safe to send. A stop string among them ends the text where it starts."""
        self.token_ids += token_ids
        self._decode_new(final=False)
        if len(self.token_ids) <= self.min_tokens:  # no stop string may end the text yet
            return self._emit(len(self.text))
        hit = self._find_stop()
        if hit is not None:
            self.stopped = True
            return self._emit(hit)
        end = len(self.text)
        return self._emit(end - self._held_back(end))

    def flush(self) -> str:
        """At the end of generation: whatever was held back is final text."""
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._emit(len(self.text))

    def _decode_new(self, final: bool) -> None:
        settled = self.decode(self.token_ids[self._prefix : self._read])
        window = self.decode(self.token_ids[self._prefix :])
        if final:
            window = window.rstrip("\ufffd")
        # A window ending in U+FFFD is a character still split across tokens: wait.
        if len(window) > len(settled) and not window.endswith("\ufffd"):
            self.text += window[len(settled) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def _find_stop(self) -> int | None:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest)
        hits = [(i, -len(s)) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        at, minus_length = min(hits)  # the earliest; there, the longest
        return at - minus_length if self.include_stop else at

    def _held_back(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, end - self.sent), best, -1):
                if self.text[end - n : end] == stop[:n]:
                    best = n
                    break
        return best
