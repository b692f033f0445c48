"""Reasoning (``<think>…</think>``) split and marker scanning shared by every family.

A reply is reasoning when the prompt ended inside an open ``<think>`` or the output (after
leading whitespace) starts with ``<think>``; reasoning runs up to the first ``</think>``
and the rest is content. A stray ``</think>`` in content is dropped, so the tag never
reaches a client. :class:`ChannelSplitter` does this incrementally and stops at the first
complete call opener, holding back any partial tag or opener at a chunk boundary. The
tags are the family's :class:`ReasoningTags` (``<think>`` / ``</think>`` for both today).

Markers (tags and call openers) are matched with :func:`marker_at`: a space in a marker
stands for any run of whitespace, including none (``'{ "name"'`` matches ``{"name"`` and
``{\\n  "name"``); every other character matches itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ReasoningTags:
    """The tags around a reply's reasoning part (a family's ``reasoning`` attribute)."""

    open: str
    close: str


# The tags both families use, and those assumed for a model without a family.
THINK = ReasoningTags("<think>", "</think>")

# marker_at results other than an end index.
PARTIAL = -1  # the text ended while it still matched: more text may complete it
NO_MATCH = -2

Channel = Literal["reasoning", "content"]


def prompt_opens_reasoning(prompt: str, tags: ReasoningTags = THINK) -> bool:
    """True if the rendered prompt ends inside an open ``tags.open`` (e.g. Qwen3-VL
    Thinking's generation prompt ``<|im_start|>assistant\\n<think>\\n``), so output starts
    as reasoning."""
    return prompt.rstrip().endswith(tags.open)


def marker_at(text: str, pos: int, marker: str) -> int:
    """Match ``marker`` at ``text[pos:]``.

    Returns:
        The end index of the match in ``text``; ``PARTIAL`` if ``text`` ends while every
        character so far matched; ``NO_MATCH`` otherwise.
    """
    i, n = pos, len(text)
    for ch in marker:
        if ch == " ":
            while i < n and text[i].isspace():
                i += 1
            if i == n:
                return PARTIAL
            continue
        if i == n:
            return PARTIAL
        if text[i] != ch:
            return NO_MATCH
        i += 1
    return i


def find_marker(text: str, markers: Sequence[str], start: int = 0) -> tuple[int, int, str | None]:
    """The earliest position from ``start`` where some marker matches fully or partially.

    Returns:
        ``(pos, end, marker)``: ``end`` is the match's end index, or ``PARTIAL`` when the
        text ends inside a possible match; ``(len(text), NO_MATCH, None)`` when none does.
        At one position a full match wins over a partial one.
    """
    if not markers:
        return len(text), NO_MATCH, None
    firsts = re.compile("[" + re.escape("".join({m[0] for m in markers})) + "]")
    for found in firsts.finditer(text, start):
        pos = found.start()
        partial: str | None = None
        for marker in markers:
            end = marker_at(text, pos, marker)
            if end >= 0:
                return pos, end, marker
            if end == PARTIAL and partial is None:
                partial = marker
        if partial is not None:
            return pos, PARTIAL, partial
    return len(text), NO_MATCH, None


class ChannelSplitter:
    """Incremental split of raw output into reasoning and content pieces.

    Args:
        reasoning_open: The prompt ended inside ``<think>``: output starts as reasoning.
        openers: Call-opener markers (see module doc); an empty tuple disables the stop.
        tags: The reasoning tags (``<think>`` / ``</think>`` unless the family says else).

    ``feed`` returns the pieces that are certain; after the first complete opener it
    returns nothing more (``stopped``) and ``finish`` hands back the rest, split.
    """

    def __init__(self, reasoning_open: bool, openers: Sequence[str], tags: ReasoningTags = THINK):
        self.channel: Channel | None = "reasoning" if reasoning_open else None
        # Whether the output had a reasoning part (open in the prompt or a leading <think>).
        self.reasoned = reasoning_open
        self.stopped = False
        self._tags = tags
        self._markers = (tags.close, *openers)
        self._tail = ""

    def feed(self, text: str) -> list[tuple[Channel, str]]:
        """Pieces of ``text`` (with what was held back) that are safe to emit, in order."""
        self._tail += text
        pieces: list[tuple[Channel, str]] = []
        while not self.stopped:
            if self.channel is None and not self._decide_start():
                break
            channel: Channel = self.channel or "content"
            pos, end, marker = find_marker(self._tail, self._markers)
            if pos:
                pieces.append((channel, self._tail[:pos]))
            if marker is None or end == PARTIAL:
                self._tail = self._tail[pos:]
                break
            if marker == self._tags.close:
                # The tag ends reasoning; in content it is stray and dropped.
                self._tail = self._tail[end:]
                self.channel = "content"
                continue
            self._tail = self._tail[pos:]
            self.stopped = True
        return pieces

    def finish(self) -> tuple[str, str]:
        """The unemitted rest as ``(reasoning_text, content_text)``, tags removed."""
        rest, self._tail = self._tail, ""
        reasoning = ""
        if self.channel == "reasoning":
            reasoning, closed, rest = rest.partition(self._tags.close)
            if not closed:
                return reasoning, ""
        return reasoning, rest.replace(self._tags.close, "")

    def _decide_start(self) -> bool:
        """Settle whether the output opens with ``<think>``; False while it cannot tell."""
        head = self._tail.lstrip()
        think = self._tags.open
        if len(head) < len(think) and think.startswith(head):
            return False
        if head.startswith(think):
            self.channel = "reasoning"
            self.reasoned = True
            self._tail = head[len(think) :]
        else:
            self.channel = "content"
        return True
