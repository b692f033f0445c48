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

from server.grammar.keywords import MAX_REPEAT

MAX_GROUP_DEPTH = 32

Ranges = list[tuple[int, int]]

# Characters a JSON string cannot hold raw: controls, '"' and '\'.
_FORBIDDEN: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
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
_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")
_GROUP_NAME = re.compile(r"\?<[A-Za-z_$][\w$]*>")


class PatternError(ValueError):
    """The pattern uses syntax the grammar cannot enforce; ``str()`` says which."""


def json_safe_pattern(pattern: str) -> tuple[str, int]:
    """Rewrite ``pattern`` for SchemaConverter (anchored ``^...$``, JSON-safe classes).

    Returns:
        The rewritten pattern and the sum of its repetition bounds (a size budget).

    Raises:
        PatternError: lookarounds, backreferences, word boundaries, ``\\p{..}``, flags,
            unbalanced brackets, anchors inside the pattern, top-level alternatives next to
            an anchor, a quantifier with nothing to repeat or above 1000, a class that only
            holds characters JSON must escape, or groups nested deeper than 32.
    """
    body = pattern
    anchored_start = body.startswith("^")
    if anchored_start:
        body = body[1:]
    anchored_end = body.endswith("$") and _unescaped(body, len(body) - 1)
    if anchored_end:
        body = body[:-1]
    parser = _Parser(body)
    text, alternatives = parser.alternation(0)
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
    return f"^{head}{text}{tail}$", parser.repeats


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
    else:
        items = _subtract(ranges, _FORBIDDEN)
        if not items:
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

    def alternation(self, depth: int) -> tuple[str, bool]:
        parts = [self._sequence(depth)]
        while self._peek() == "|":
            self.pos += 1
            parts.append(self._sequence(depth))
        return "|".join(parts), len(parts) > 1

    def _sequence(self, depth: int) -> str:
        out = []
        while (char := self._peek()) is not None and char not in "|)":
            atom = self._atom(depth)
            out.append(atom + self._quantifier())
        return "".join(out)

    def _atom(self, depth: int) -> str:
        char = self.text[self.pos]
        if char == "(":
            return self._group(depth)
        if char == "[":
            return self._class()
        self.pos += 1
        if char == ".":
            return _emit_class(_LINE_TERMINATORS, negated=True)
        if char == "\\":
            escaped = self._escape(in_class=False)
            if isinstance(escaped, int):
                return _emit_char(escaped)
            return _emit_class(escaped[0], negated=escaped[1])
        if char in "^$":
            raise PatternError(f"has '{char}' inside the pattern (only at its ends)")
        if char in "*+?" or (char == "{" and _QUANTIFIER.match(self.text, self.pos - 1)):
            raise PatternError(f"has '{char}' with nothing to repeat")
        return _emit_char(ord(char))

    def _group(self, depth: int) -> str:
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
        inner, _ = self.alternation(depth + 1)
        if self._peek() != ")":
            raise PatternError("has an unbalanced '('")
        self.pos += 1
        return f"({inner})"

    def _quantifier(self) -> str:
        char = self._peek()
        if char is not None and char in "*+?":
            self.pos += 1
            quantifier = char
        elif char == "{" and (match := _QUANTIFIER.match(self.text, self.pos)):
            self.pos = match.end()
            low, comma, high_text = match.group(1), match.group(2), match.group(3)
            high = int(high_text) if high_text else None
            if max(int(low), high or 0) > MAX_REPEAT:
                raise PatternError(f"repeats more than {MAX_REPEAT} times")
            if high is not None and high < int(low):
                raise PatternError(f"has a quantifier out of order '{match.group(0)}'")
            self.repeats += max(int(low), high or 0)
            quantifier = f"{{{int(low)}{',' if comma else ''}{high if high is not None else ''}}}"
        else:
            return ""
        if self._peek() == "?":
            self.pos += 1  # lazy: a full match accepts the same strings
        following = self._peek()
        if following is not None and (
            following in "*+?" or (following == "{" and _QUANTIFIER.match(self.text, self.pos))
        ):
            raise PatternError(f"has '{following}' with nothing to repeat")
        return quantifier

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
        elif char == "0" and not (self._peek() or "").isdigit():
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
