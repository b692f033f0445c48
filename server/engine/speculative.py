"""Prompt-lookup speculation: draft tokens for a sequence from its own history (prompt and
output so far), no draft model.

The scheduler decodes a sequence's last token together with the draft, samples each row
with the sequence's own sampler and keeps the draft while the sample equals it; the first
mismatch's sample is the correction (see ``scheduler``). Every emitted token is a real
sample, so any sampler chain (grammar included) gives the same output distribution as
without speculation, and greedy output the same tokens.

The drafter looks up the longest recent match (``min_key`` .. ``max_key`` tokens) of the
history's tail earlier in the history and proposes what followed it; how many tokens it
proposes follows the sequence's acceptance (:class:`AdaptiveLength`), so free text, where
drafts miss, soon stops paying for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings of an engine.

    Attributes:
        n_max: Most draft tokens a sequence gets in one step.
        min_key: Fewest tail tokens that must match for a prompt-lookup draft.
        max_key: Most tail tokens compared (a longer match wins over a more recent one).
        draft: A draft model GGUF (same vocabulary as the served model): drafts come
            from it (``engine/draft_model.py``) instead of prompt lookup; None: lookup.
        p_min: With a draft model, a sequence's draft stops at the first token the draft
            model gives a probability below this.
    """

    n_max: int = 16
    min_key: int = 2
    max_key: int = 8
    draft: Path | None = None
    p_min: float = 0.75


class Drafter(Protocol):
    """One generation's source of draft tokens, as the scheduler drives it."""

    def push(self, token: int) -> None:
        """Add a sampled token to the sequence's history."""
        ...

    def propose(self, room: int) -> list[int]:
        """Up to ``room`` tokens expected after the history (may be empty)."""
        ...

    def record(self, drafted: int, accepted: int) -> None:
        """A verified draft's outcome: ``accepted`` of its ``drafted`` tokens kept."""
        ...


# The default settings (frozen, so one shared instance is safe).
PROMPT_LOOKUP = SpecConfig()


class AdaptiveLength:
    """A sequence's draft length, following its acceptance.

    Starts at ``START``; a fully accepted draft doubles it (up to ``n_max``), a partly
    accepted one sets it to one past what was accepted, a wholly rejected one halves it.
    After ``MISSES_OFF`` wholly rejected drafts in a row it is off for ``cooldown`` steps,
    then retried at ``START``; each further switch-off doubles the cooldown (up to
    ``COOLDOWN_MAX``), a fully accepted draft resets it.
    """

    START = 4
    MISSES_OFF = 3
    COOLDOWN_MIN = 8
    COOLDOWN_MAX = 256

    def __init__(self, n_max: int):
        self.n_max = n_max
        self.length = min(self.START, n_max)
        self.misses = 0
        self.cooldown = 0  # steps left with speculation off
        self._next_cooldown = self.COOLDOWN_MIN

    def limit(self) -> int:
        """Draft tokens allowed this step (0: off); one call per step."""
        if self.cooldown > 0:
            self.cooldown -= 1
            if self.cooldown == 0:
                self.length = min(self.START, self.n_max)
            return 0
        return self.length

    def record(self, drafted: int, accepted: int) -> None:
        """The outcome of a verified draft: ``accepted`` of its ``drafted`` tokens kept."""
        if drafted <= 0:
            return
        if accepted >= drafted:
            self.length = min(self.n_max, 2 * self.length)
            self.misses = 0
            self._next_cooldown = self.COOLDOWN_MIN
        elif accepted > 0:
            self.length = max(1, min(self.n_max, accepted + 1))
            self.misses = 0
        else:
            self.length = max(1, self.length // 2)
            self.misses += 1
            if self.misses >= self.MISSES_OFF:
                self.misses = 0
                self.cooldown = self._next_cooldown
                self._next_cooldown = min(self.COOLDOWN_MAX, 2 * self._next_cooldown)


class PromptLookup:
    """One sequence's token history and its n-gram drafts.

    Args:
        history: The prompt's token ids; negative ids stand for non-text rows (images)
            and are never proposed.
        capacity: Most tokens the history will hold (prompt + generated); more are
            accepted (the buffer grows).
        config: Key sizes and the largest draft.
    """

    def __init__(self, history: Sequence[int], capacity: int, config: SpecConfig):
        self._config = config
        self._tokens = np.empty(max(capacity, len(history), 1), dtype=np.int64)
        self._tokens[: len(history)] = history
        self._n = len(history)
        self.length = AdaptiveLength(config.n_max)

    def push(self, token: int) -> None:
        """Add a sampled token to the history."""
        if self._n == len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.empty_like(self._tokens)])
        self._tokens[self._n] = token
        self._n += 1

    def propose(self, room: int) -> list[int]:
        """Up to ``min(room, adaptive length)`` tokens expected after the history (may be
        empty); counts as this step's turn of the adaptive length."""
        if room <= 0:
            return []
        limit = min(room, self.length.limit())
        if limit <= 0:
            return []
        return self.lookup(limit)

    def lookup(self, limit: int) -> list[int]:
        """The ``limit`` tokens that followed the longest (then latest) earlier match of the
        history's tail (at least ``min_key`` tokens); [] when there is none."""
        n = self._n
        config = self._config
        if n <= config.min_key or limit <= 0:
            return []
        tokens = self._tokens[:n]
        # Candidate match ends: earlier positions holding the last token.
        ends = np.flatnonzero(tokens[: n - 1] == tokens[n - 1])
        if len(ends) == 0:
            return []
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for back in range(1, min(config.max_key, n)):
            before = ends - back
            alive &= before >= 0
            alive &= tokens[np.maximum(before, 0)] == tokens[n - 1 - back]
            if not alive.any():
                break
            matched += alive
        best = int(matched.max())
        if best < config.min_key:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])
        draft = tokens[end + 1 : end + 1 + limit]
        negative = np.flatnonzero(draft < 0)
        if len(negative):
            draft = draft[: negative[0]]
        return [int(token) for token in draft]

    def record(self, drafted: int, accepted: int) -> None:
        """Feed a verified draft's outcome to the adaptive length."""
        self.length.record(drafted, accepted)
