"""JSON-schema ``pattern`` (ECMA-262 regex) → the regex subset SchemaConverter translates
faithfully into GBNF, spelled so the generated JSON string stays valid.

SchemaConverter copies a pattern's characters into the grammar as raw JSON-string text: a
``.``, a negated class or a literal ``"`` would let the model write an unescaped quote,
backslash or control character, and ``\\d`` or ``\\.`` make llama.cpp refuse the grammar.
So the pattern is parsed here and re-emitted: every class as explicit code-point ranges
(``\\xHH``) that leave out what JSON must escape, literal ``"``/``\\``/controls as their
JSON escapes, shorthand classes expanded, lazy markers dropped (a full match has the same
language either way). Unanchored ends get ``.*``, as a JSON-schema pattern is a search.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from ggufserve.grammar.keywords import MAX_REPEAT

MAX_GROUP_DEPTH = 32

Ranges = list[tuple[int, int]]

# Characters a JSON string cannot hold raw: controls, '"' and '\'.
_FORBIDDEN: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
# Code points no UTF-8 text holds: a class of only these matches nothing.
_NOT_TEXT: Ranges = [(0xD800, 0xDFFF), (0x110000, 0x7FFFFFFF)]
_JSON_ESCAPES = {'"': '"', "\\": "\\", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [
    (0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
    (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF),
]  # fmt: skip
_LINE_TERMINATORS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
_SHORTHANDS = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CONTROL_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D}
# Passed to SchemaConverter as raw literal text; everything else goes through a class.
_RAW_SAFE = frozenset(string.ascii_letters + string.digits + " !#%&',-/:;<=>@_`~")
# ASCII digits only: ECMA-262 reads other digits as literal text.
_QUANTIFIER = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")
# Longest bound read with int(): MAX_REPEAT has 4 digits; Python refuses over 4,300.
_MAX_BOUND_DIGITS = 9
_GROUP_NAME = re.compile(r"\?<[A-Za-z_$][\w$]*>")


class PatternError(ValueError):
    """The pattern uses syntax the grammar cannot enforce; ``str()`` says which."""


@dataclass(frozen=True)
class Shape:
    """Size of a (sub)pattern once the grammar expands it.

    Attributes:
        positions: Character positions, bounded repetition expanded (``(ab){3}``: 6).
        width: Parse alternatives it can keep alive at once in llama.cpp: bounded
            repetition of a variable-length body multiplies (``(a{0,9}){0,9}``: 81
            (copy, position) pairs), repetition of one character does not (``a{0,9}``: 2).
        simple: One character or class, unquantified.
    """

    positions: int
    width: int
    simple: bool = False


_ONE_CHAR = Shape(1, 1, simple=True)
_EMPTY = Shape(0, 0)
_ANYTHING = Shape(1, 2)  # the `.*` added at an unanchored end


def _repeat(shape: Shape, low: int, high: int | None) -> Shape:
    """Shape of ``x{low,high}`` (high None: unbounded) for ``x`` of ``shape``."""
    copies = max(high if high is not None else low + 1, 1)
    positions = shape.positions * copies
    if shape.simple:
        return Shape(positions, 2)
    if high is not None and high <= 1:
        return Shape(positions, shape.width + 1)
    # Copies are distinct grammar positions (an unbounded tail recurses over one copy):
    # an ambiguous split of the text keeps every position of every copy alive.
    return Shape(positions, max(positions, shape.width + 1))


def _join(shapes: list[Shape]) -> Shape:
    """Shape of a sequence or an alternation of ``shapes`` (both: sums)."""
    if len(shapes) == 1:
        return shapes[0]
    return Shape(sum(s.positions for s in shapes), sum(s.width for s in shapes))


def json_safe_pattern(pattern: str) -> tuple[str, int, Shape]:
    """Rewrite ``pattern`` for SchemaConverter (anchored ``^...$``, JSON-safe classes).

    Returns:
        The rewritten pattern, the sum of its repetition bounds (a size budget), and its
        :class:`Shape` (the grammar's cost drivers).

    Raises:
        PatternError: lookarounds, backreferences, word boundaries, ``\\p{..}``, flags,
            unbalanced brackets, anchors inside the pattern, top-level alternatives next to
            an anchor, a quantifier with nothing to repeat or above 1000, a class that
            matches no character a JSON string can hold unescaped (so the pattern could
            match nothing), or groups nested deeper than 32.
    """
    body = pattern
    anchored_start = body.startswith("^")
    if anchored_start:
        body = body[1:]
    anchored_end = body.endswith("$") and _unescaped(body, len(body) - 1)
    if anchored_end:
        body = body[:-1]
    parser = _Parser(body)
    text, alternatives, shape = parser.alternation(0)
    if parser.pos != len(body):
        raise PatternError("has an unbalanced ')'")
    if alternatives and (anchored_start or anchored_end):
        # '^a|b$' means '(^a)|(b$)': not expressible as one anchored match.
        raise PatternError("mixes top-level '|' with '^' or '$'; wrap the alternatives in (...)")
    if alternatives:
        text = f"({text})"
    anything = _emit_class([], negated=True) + "*"
    head = "" if anchored_start else anything
    tail = "" if anchored_end else anything
    ends = [_ANYTHING for anchored in (anchored_start, anchored_end) if not anchored]
    return f"^{head}{text}{tail}$", parser.repeats, _join([shape, *ends])


def _unescaped(text: str, index: int) -> bool:
    backslashes = len(text[:index]) - len(text[:index].rstrip("\\"))
    return backslashes % 2 == 0


def _merge(ranges: Ranges) -> Ranges:
    merged: Ranges = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in _merge(ranges):
        for r_lo, r_hi in removed:
            if r_hi < lo or r_lo > hi:
                continue
            if r_lo > lo:
                out.append((lo, r_lo - 1))
            lo = r_hi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def _hex(code: int) -> str:
    if code < 0x100:
        return f"\\x{code:02X}"
    return f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _emit_class(ranges: Ranges, *, negated: bool) -> str:
    if negated:
        items = _merge(ranges + _FORBIDDEN)
        if _merge(items + _NOT_TEXT) == [(0, _NOT_TEXT[-1][1])]:
            raise PatternError("has a negated class that matches no character")
    else:
        items = _subtract(ranges, _FORBIDDEN)
        if not _subtract(items, _NOT_TEXT):
            raise PatternError("has a class that only matches characters JSON must escape")
    body = "".join(_hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}" for lo, hi in items)
    return f"[{'^' if negated else ''}{body}]"


def _emit_char(code: int) -> str:
    char = chr(code)
    if char in _RAW_SAFE:
        return char
    if code < 0x20 or char in _JSON_ESCAPES:
        # The JSON text for this character is an escape sequence: match that text.
        escape = _JSON_ESCAPES.get(char) or f"u{code:04x}"
        spelled = (c if c in _RAW_SAFE else f"[{_hex(ord(c))}]" for c in escape)
        return "([\\x5C]" + "".join(spelled) + ")"
    return f"[{_hex(code)}]"


class _Parser:
    """Recursive descent over one ECMA-262 pattern body, emitting converter syntax."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.repeats = 0

    def _peek(self, offset: int = 0) -> str | None:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else None

    def alternation(self, depth: int) -> tuple[str, bool, Shape]:
        parts = [self._sequence(depth)]
        while self._peek() == "|":
            self.pos += 1
            parts.append(self._sequence(depth))
        shape = _join([shape for _, shape in parts])
        if len(parts) > 1:
            shape = Shape(shape.positions, shape.width)  # never simple
        return "|".join(text for text, _ in parts), len(parts) > 1, shape

    def _sequence(self, depth: int) -> tuple[str, Shape]:
        out = []
        shapes = []
        while (char := self._peek()) is not None and char not in "|)":
            atom, shape = self._atom(depth)
            quantifier, bounds = self._quantifier()
            out.append(atom + quantifier)
            shapes.append(_repeat(shape, *bounds) if bounds is not None else shape)
        return "".join(out), _join(shapes) if shapes else _EMPTY

    def _atom(self, depth: int) -> tuple[str, Shape]:
        char = self.text[self.pos]
        if char == "(":
            return self._group(depth)
        if char == "[":
            return self._class(), _ONE_CHAR
        self.pos += 1
        if char == ".":
            return _emit_class(_LINE_TERMINATORS, negated=True), _ONE_CHAR
        if char == "\\":
            escaped = self._escape(in_class=False)
            if isinstance(escaped, int):
                return _emit_char(escaped), _ONE_CHAR
            return _emit_class(escaped[0], negated=escaped[1]), _ONE_CHAR
        if char in "^$":
            raise PatternError(f"has '{char}' inside the pattern (only at its ends)")
        if char in "*+?" or (char == "{" and _QUANTIFIER.match(self.text, self.pos - 1)):
            raise PatternError(f"has '{char}' with nothing to repeat")
        return _emit_char(ord(char)), _ONE_CHAR

    def _group(self, depth: int) -> tuple[str, Shape]:
        if depth >= MAX_GROUP_DEPTH:
            raise PatternError(f"nests groups deeper than {MAX_GROUP_DEPTH}")
        self.pos += 1
        if self._peek() == "?":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif match := _GROUP_NAME.match(self.text, self.pos):
                self.pos = match.end()
            else:
                raise PatternError("has a lookaround or inline flags '(?...)'")
        inner, _, shape = self.alternation(depth + 1)
        if self._peek() != ")":
            raise PatternError("has an unbalanced '('")
        self.pos += 1
        return f"({inner})", shape

    def _quantifier(self) -> tuple[str, tuple[int, int | None] | None]:
        """The quantifier after an atom, re-spelled, and its (low, high) bounds (high None:
        unbounded); ("", None) when there is none."""
        char = self._peek()
        if char is not None and char in "*+?":
            self.pos += 1
            quantifier = char
            bounds: tuple[int, int | None] = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and (match := _QUANTIFIER.match(self.text, self.pos)):
            self.pos = match.end()
            low, comma, high_text = match.group(1), match.group(2), match.group(3)
            if max(len(low), len(high_text or "")) > _MAX_BOUND_DIGITS:
                raise PatternError(f"repeats more than {MAX_REPEAT} times")
            high = int(high_text) if high_text else None
            if max(int(low), high or 0) > MAX_REPEAT:
                raise PatternError(f"repeats more than {MAX_REPEAT} times")
            if high is not None and high < int(low):
                raise PatternError(f"has a quantifier out of order '{match.group(0)}'")
            self.repeats += max(int(low), high or 0)
            quantifier = f"{{{int(low)}{',' if comma else ''}{high if high is not None else ''}}}"
            bounds = (int(low), high if comma else int(low))
        else:
            return "", None
        if self._peek() == "?":
            self.pos += 1  # lazy: a full match accepts the same strings
        following = self._peek()
        if following is not None and (
            following in "*+?" or (following == "{" and _QUANTIFIER.match(self.text, self.pos))
        ):
            raise PatternError(f"has '{following}' with nothing to repeat")
        return quantifier, bounds

    def _class(self) -> str:
        self.pos += 1
        negated = self._peek() == "^"
        self.pos += int(negated)
        ranges: Ranges = []
        if self._peek() == "]" and not negated:
            raise PatternError("has an empty class '[]'")
        while (char := self._peek()) != "]":
            if char is None:
                raise PatternError("has an unbalanced '['")
            low = self._class_atom()
            if not isinstance(low, int):
                if low[1]:
                    raise PatternError("has a negated shorthand (\\D, \\W, \\S) inside a class")
                ranges += low[0]
                continue
            if self._peek() == "-" and self._peek(1) not in (None, "]"):
                self.pos += 1
                high = self._class_atom()
                if not isinstance(high, int) or high < low:
                    raise PatternError("has an invalid class range")
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        self.pos += 1
        return _emit_class(ranges, negated=negated)

    def _class_atom(self) -> int | tuple[Ranges, bool]:
        char = self.text[self.pos]
        self.pos += 1
        if char == "\\":
            return self._escape(in_class=True)
        return ord(char)

    def _escape(self, *, in_class: bool) -> int | tuple[Ranges, bool]:
        """Parse the escape after a backslash: a code point, or a shorthand class as
        (ranges, negated)."""
        char = self._peek()
        if char is None:
            raise PatternError("ends with a lone backslash")
        self.pos += 1
        if char.lower() in _SHORTHANDS:
            return list(_SHORTHANDS[char.lower()]), char.isupper()
        if char == "b" and in_class:
            return 0x08
        if char in _CONTROL_ESCAPES:
            code = _CONTROL_ESCAPES[char]
        elif char == "0" and (self._peek() or "") not in string.digits:
            code = 0
        elif char in "xu":
            code = self._hex_escape(char)
        elif char == "c" and (letter := self._peek() or "") and letter in string.ascii_letters:
            self.pos += 1
            code = ord(letter) % 32
        elif char.isalnum() or char == "_":
            raise PatternError(f"has an unsupported escape '\\{char}'")
        else:
            code = ord(char)
        return code

    def _hex_escape(self, kind: str) -> int:
        width = 2 if kind == "x" else 4
        digits = self.text[self.pos : self.pos + width]
        if len(digits) != width or any(c not in string.hexdigits for c in digits):
            raise PatternError(f"has an invalid '\\{kind}' escape")
        self.pos += width
        code = int(digits, 16)
        if 0xD800 <= code <= 0xDFFF:
            low = self.text[self.pos : self.pos + 6]
            low_ok = re.fullmatch(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}", low)
            low_code = int(low[2:], 16) if low_ok else 0
            if not (code <= 0xDBFF and low_code):
                raise PatternError("has a lone surrogate escape")
            self.pos += 6
            code = 0x10000 + ((code - 0xD800) << 10) + (low_code - 0xDC00)
        return code
