"""Special tokens of a vocabulary: llama.cpp's cut of text at their spellings, found in
linear time, and the escaping that keeps request text from ever becoming one of them.

llama.cpp tokenizes with ``parse_special`` by cutting the text at every spelling of a
CONTROL, USER_DEFINED or UNKNOWN token (``tokenizer_st_partition`` in llama-vocab.cpp:
spellings longest in bytes first, leftmost non-overlapping matches inside the fragments
still free), then tokenizing each text fragment on its own. With ``parse_special`` off it
still cuts at USER_DEFINED spellings. Its fragment list is walked from the start for every
match and visited once per special token, so newline-heavy text costs quadratic time.

:class:`SpecialTokens` computes the same cut in one pass (spellings indexed by first
character and length; runs of one character, such as Gemma's newline and space tokens,
split arithmetically) and turns it into a :data:`Plan`: token ids and short pieces of text
that llama.cpp then tokenizes with ``parse_special`` off, a bounded number of fragments at a
time, so its cost stays linear. The ids are llama.cpp's own for the same text.

*Markup* tokens (CONTROL and UNKNOWN ones, and the ids the engine names, e.g. image
boundaries that a vocabulary marks USER_DEFINED) are the ones only a chat template may
write. :class:`Placeholders` replaces their spellings in request strings by private-use
characters before rendering; the plan restores them inside text fragments, where they are
tokenized as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import llama_cpp

CONTROL = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
UNKNOWN = llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
USER_DEFINED = llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
LSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP
RSTRIP = llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
SPECIAL = CONTROL | UNKNOWN | USER_DEFINED

# Fragments (text pieces and USER_DEFINED tokens) passed to llama.cpp in one call: its cost
# per call grows with the square of the fragments in it (measured: 80k characters of "x\n"
# in one call take 14 s, in calls of 64 fragments 0.08 s).
FRAGMENTS_PER_CALL = 64
# Placeholders: Supplementary Private Use Area-B (U+100000..U+10FFFD).
PRIVATE_FIRST, PRIVATE_LAST = 0x100000, 0x10FFFD
PRIVATE = re.compile("[\U00100000-\U0010fffd]")
# Whitespace as C's isspace() sees it (llama.cpp's LSTRIP/RSTRIP).
C_SPACE = frozenset(" \t\n\v\f\r")

# What a prompt becomes: markup token ids, and text to tokenize with parse_special off.
Plan = list[int | str]


class PlaceholdersExhausted(ValueError):
    """A request uses so many private-use characters that no placeholder is left."""


@dataclass(frozen=True)
class _Run:
    """Tokens made of one repeated character: length → token id, longest first."""

    lengths: tuple[tuple[int, int], ...]


class SpellingIndex:
    """Finds spellings in text: candidate starts by a one-class regex over first
    characters, then one set lookup per distinct length starting with that character."""

    def __init__(self, spellings: Iterable[str]):
        by_first: dict[str, dict[int, set[str]]] = {}
        for spelling in spellings:
            by_first.setdefault(spelling[0], {}).setdefault(len(spelling), set()).add(spelling)
        self._lengths = {
            first: tuple((n, frozenset(group)) for n, group in sorted(sizes.items(), reverse=True))
            for first, sizes in by_first.items()
        }
        chars = "".join(re.escape(c) for c in sorted(by_first))
        self._starts = re.compile(f"[{chars}]") if chars else None

    def all(self, text: str) -> Iterator[tuple[int, str]]:
        """Every occurrence as (start, spelling), by start (longest first at one start)."""
        if self._starts is None:
            return
        for match in self._starts.finditer(text):
            start = match.start()
            for size, group in self._lengths[text[start]]:
                piece = text[start : start + size]
                if piece in group:
                    yield start, piece

    def leftmost_longest(self, text: str) -> Iterator[tuple[int, str]]:
        """Non-overlapping occurrences, scanning left to right, longest at each start."""
        end = 0
        for start, spelling in self.all(text):
            if start >= end:
                end = start + len(spelling)
                yield start, spelling


class SpecialTokens:
    """The special tokens of one vocabulary, for cutting and escaping prompt text.

    Args:
        tokens: ``(id, text, attr)`` of every token whose llama.cpp attributes include
            CONTROL, USER_DEFINED or UNKNOWN.
        markup_ids: Further ids only a template may write (e.g. image boundaries).
    """

    def __init__(self, tokens: Iterable[tuple[int, str, int]], markup_ids: Iterable[int] = ()):
        extra = set(markup_ids)
        self._id: dict[str, int] = {}
        self._rank: dict[str, tuple[int, int]] = {}
        self.text: dict[int, str] = {}
        self.markup_ids: set[int] = set()
        self._lstrip: set[str] = set()
        self._rstrip: set[str] = set()
        # Spellings llama.cpp cuts at even with parse_special off.
        self._cut_always: set[str] = set()
        for token, text, attr in tokens:
            if not text or not attr & SPECIAL:
                continue
            self.text[token] = text
            if attr & (CONTROL | UNKNOWN) or token in extra:
                self.markup_ids.add(token)
            # llama.cpp orders by byte length; among equal spellings the lowest id wins.
            rank = (-len(text.encode("utf-8", "surrogatepass")), token)
            if text not in self._rank or rank < self._rank[text]:
                self._rank[text], self._id[text] = rank, token
            if not attr & (CONTROL | UNKNOWN):
                self._cut_always.add(text)
            if attr & LSTRIP:
                self._lstrip.add(text)
            if attr & RSTRIP:
                self._rstrip.add(text)
        self._runs = {} if self._lstrip or self._rstrip else self._run_chars()
        others = [s for s in self._id if s[0] not in self._runs]
        self._index = SpellingIndex(others)
        self._markup = SpellingIndex(self.text[t] for t in self.markup_ids)
        chars = "".join(re.escape(c) for c in sorted(self._runs))
        self._run_pattern = re.compile(f"([{chars}])\\1*") if chars else None
        self._split_cache: dict[tuple[str, int], tuple[tuple[int, int, int], ...]] = {}

    def _run_chars(self) -> dict[str, _Run]:
        # A character qualifies when every special spelling holding it is a run of it alone:
        # its runs then never overlap another special, and split by length only.
        runs: dict[str, dict[int, int]] = {}
        mixed: set[str] = set()
        for spelling, token in self._id.items():
            if spelling == spelling[0] * len(spelling):
                runs.setdefault(spelling[0], {})[len(spelling)] = token
            else:
                mixed.update(spelling)
        return {
            char: _Run(tuple(sorted(sizes.items(), reverse=True)))
            for char, sizes in runs.items()
            if char not in mixed
        }

    # ---- cutting ------------------------------------------------------------------

    def partition(self, text: str) -> list[int | str]:
        """``text`` cut as llama.cpp's ``tokenizer_st_partition`` cuts it with
        ``parse_special`` on: special token ids and the text fragments between them.

        Exact for vocabularies without LSTRIP/RSTRIP tokens (Gemma 3, Qwen3-VL); with them,
        whitespace next to such a token is dropped as llama.cpp drops it.
        """
        taken = self._runs_taken(text) + self._others_taken(text)
        taken.sort()
        out: list[int | str] = []
        pos = 0
        previous = ""
        for start, end, token in taken:
            spelling = self.text[token]
            out += self._gap(text, pos, start, previous, spelling)
            out.append(token)
            pos, previous = end, spelling
        out += self._gap(text, pos, len(text), previous, "")
        return out

    def _gap(self, text: str, start: int, end: int, before: str, after: str) -> list[int | str]:
        if before in self._rstrip:
            while start < end and text[start] in C_SPACE:
                start += 1
        if after in self._lstrip:
            while end > start and text[end - 1] in C_SPACE:
                end -= 1
        return [text[start:end]] if end > start else []

    def _runs_taken(self, text: str) -> list[tuple[int, int, int]]:
        if self._run_pattern is None:
            return []
        taken: list[tuple[int, int, int]] = []
        for match in self._run_pattern.finditer(text):
            start, end = match.span()
            taken += [
                (start + a, start + b, t) for a, b, t in self._run_split(text[start], end - start)
            ]
        return taken

    def _run_split(self, char: str, size: int) -> tuple[tuple[int, int, int], ...]:
        # llama.cpp takes the longest run token leftmost and repeatedly, then the next
        # longest in what is left; a remainder no token fits stays text at the end.
        key = (char, size)
        cached = self._split_cache.get(key)
        if cached is not None:
            return cached
        out: list[tuple[int, int, int]] = []
        pos, left = 0, size
        for length, token in self._runs[char].lengths:
            while left >= length:
                out.append((pos, pos + length, token))
                pos, left = pos + length, left - length
        result = tuple(out)
        if size <= 4096:
            self._split_cache[key] = result
        return result

    def _others_taken(self, text: str) -> list[tuple[int, int, int]]:
        taken: list[tuple[int, int, int]] = []
        cluster: list[tuple[int, str]] = []
        cluster_end = -1
        for start, spelling in self._index.all(text):
            if cluster and start >= cluster_end:
                taken += self._resolve(cluster)
                cluster = []
            cluster.append((start, spelling))
            cluster_end = max(cluster_end, start + len(spelling))
        if cluster:
            taken += self._resolve(cluster)
        return taken

    def _resolve(self, cluster: list[tuple[int, str]]) -> list[tuple[int, int, int]]:
        """Overlapping occurrences, chosen in llama.cpp's order: spellings by rank, each
        taking its leftmost non-overlapping matches inside the fragments still free."""
        if len(cluster) == 1:
            start, spelling = cluster[0]
            return [(start, start + len(spelling), self._id[spelling])]
        starts: dict[str, list[int]] = {}
        for start, spelling in cluster:
            starts.setdefault(spelling, []).append(start)
        free = [(cluster[0][0], max(s + len(p) for s, p in cluster))]
        taken: list[tuple[int, int, int]] = []
        for spelling in sorted(starts, key=self._rank.__getitem__):
            size, token = len(spelling), self._id[spelling]
            remaining: list[tuple[int, int]] = []
            for low, high in free:
                cursor = low
                for start in starts[spelling]:
                    if start >= cursor and start + size <= high:
                        if start > cursor:
                            remaining.append((cursor, start))
                        taken.append((start, start + size, token))
                        cursor = start + size
                if cursor < high:
                    remaining.append((cursor, high))
            free = remaining
        return taken

    def plan(self, text: str, restore: Mapping[str, str] | None = None) -> Plan:
        """What tokenizing ``text`` with ``parse_special`` on takes: markup token ids, and
        text (fragments with the USER_DEFINED spellings between them, at most
        ``FRAGMENTS_PER_CALL`` of both a piece) to tokenize with ``parse_special`` off.
        Every piece starts and ends where llama.cpp's own cut does, so the ids equal
        llama.cpp's for the whole text.

        ``restore`` maps placeholders (see :class:`Placeholders`) to the spellings they
        stand for: a fragment holding one is restored and becomes plain text, markup
        spellings included (USER_DEFINED markup is split after its first character, since
        llama.cpp would cut at it even with ``parse_special`` off).
        """
        steps: Plan = []
        chunk: list[str] = []
        for item in self.partition(text):
            if isinstance(item, int):
                if item in self.markup_ids:
                    steps += _flush(chunk)
                    steps.append(item)
                    continue
                chunk.append(self.text[item])
            elif restore and PRIVATE.search(item):
                steps += _flush(chunk)
                steps += self._restored(item, restore)
                continue
            else:
                chunk.append(item)
            # llama.cpp's list holds the USER_DEFINED tokens too: bound both.
            if len(chunk) >= FRAGMENTS_PER_CALL:
                steps += _flush(chunk)
        steps += _flush(chunk)
        return steps

    def _restored(self, fragment: str, restore: Mapping[str, str]) -> list[int | str]:
        out: list[int | str] = []
        pending: list[str] = []
        for char in fragment:
            spelling = restore.get(char)
            if spelling is None:
                pending.append(char)
            elif spelling in self._cut_always:
                out += _flush(pending)
                out += [spelling[:1], spelling[1:]] if len(spelling) > 1 else [spelling]
            else:
                pending.append(spelling)
        out += _flush(pending)
        return out

    # ---- escaping -----------------------------------------------------------------

    def escape(self, text: str, placeholders: Placeholders) -> str:
        """``text`` with every markup spelling replaced by its placeholder.

        Raises:
            PlaceholdersExhausted: no private-use character is left for a new spelling.
        """
        pieces: list[str] = []
        pos = 0
        for start, spelling in self._markup.leftmost_longest(text):
            pieces += [text[pos:start], placeholders.of(spelling)]
            pos = start + len(spelling)
        if not pieces:
            return text
        pieces.append(text[pos:])
        return "".join(pieces)


def _flush(buffer: list[str]) -> list[int | str]:
    if not buffer:
        return []
    text = "".join(buffer)
    buffer.clear()
    return [text]


class Placeholders:
    """Private-use characters standing for markup spellings in one request's strings.

    Private-use characters the request itself holds (``taken``) are never allocated, so
    they pass through unchanged; the template's own private-use characters should be in
    ``taken`` too.
    """

    def __init__(self, taken: Iterable[str] = ()):
        self._taken = set(taken)
        self._by_spelling: dict[str, str] = {}
        self.restore: dict[str, str] = {}
        self._next = PRIVATE_FIRST

    def of(self, spelling: str) -> str:
        """The placeholder for ``spelling`` (the same one every time).

        Raises:
            PlaceholdersExhausted: every private-use character is taken.
        """
        char = self._by_spelling.get(spelling)
        if char is not None:
            return char
        while self._next <= PRIVATE_LAST and chr(self._next) in self._taken:
            self._next += 1
        if self._next > PRIVATE_LAST:
            raise PlaceholdersExhausted("no private-use character left for a placeholder")
        char = chr(self._next)
        self._next += 1
        self._by_spelling[spelling] = char
        self.restore[char] = spelling
        return char
