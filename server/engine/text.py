"""Turn a stream of token bytes into safe-to-send text: whole UTF-8 characters only, and
nothing that could be the start of a stop string until it is known not to be one."""

from __future__ import annotations

import codecs


class StopScanner:
    """Incremental UTF-8 decoding with OpenAI ``stop`` semantics.

    A multi-byte character split across tokens is held until complete; invalid bytes
    become U+FFFD. Text that ends with a prefix of a stop string is held back; when a stop
    string appears, the text before it is released and the stop itself never is.

    Args:
        stops: Stop strings (non-empty).
    """

    def __init__(self, stops: list[str]):
        self._stops = list(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        # The stop string that ended the text (the earliest one in it), once one has.
        self.matched: str | None = None

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Add one token's bytes.

        Returns:
            (text now safe to send, whether a stop string was reached).
        """
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return out, False
        hits = [(i, stop) for stop in self._stops if (i := self._pending.find(stop)) >= 0]
        if hits:
            start, self.matched = min(hits, key=lambda hit: hit[0])
            out = self._pending[:start]
            self._pending = ""
            return out, True
        keep = self._held_back_length()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text at the end of generation (no stop string followed it)."""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        pending = self._pending
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
