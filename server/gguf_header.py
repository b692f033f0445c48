"""Read a GGUF file's metadata (key/value header) without its arrays or tensors.

gguf-py's ``GGUFReader`` turns every array element into a numpy view: on Gemma 3's
262k-token vocabulary that takes half a minute on a small machine. The memory estimate
needs a handful of scalars, so this reader walks the header once, skipping array bodies
(string arrays by their length prefixes) and returning scalars plus the integer arrays
it was asked for.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
# GGUF value types (gguf-py's GGUFValueType): struct format of the fixed-size ones.
_SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
_STRING = 8
_ARRAY = 9
# A key or string longer than this means a corrupt header, not a real model: 64 MiB.
MAX_STRING_BYTES = 64 * 1024 * 1024


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file, or its header is truncated or malformed."""


class _Cursor:
    def __init__(self, data: mmap.mmap, order: str):
        self.data = data
        self.order = order
        self.pos = 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise GGUFHeaderError("truncated GGUF header")
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        length = self.take("Q")
        if length > MAX_STRING_BYTES or self.pos + length > len(self.data):
            raise GGUFHeaderError("bad string length in GGUF header")
        value = bytes(self.data[self.pos : self.pos + length])
        self.pos += length
        return value

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            length = self.take("Q")
            if self.pos + length > len(self.data):
                raise GGUFHeaderError("bad string length in GGUF header")
            self.pos += length


def read_metadata(
    path: Path, want_array: Callable[[str], bool] = lambda key: False
) -> dict[str, Any]:
    """The header's scalar values by key (strings decoded as UTF-8), plus the numeric
    arrays whose key ``want_array`` accepts (as lists). Other arrays appear as their length.

    Raises:
        GGUFHeaderError: not a GGUF file, unknown value type, or a truncated header.
        OSError: the file cannot be read.
    """
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != MAGIC:
            raise GGUFHeaderError("not a GGUF file")
        order = "<"
        if struct.unpack_from("<I", data, 4)[0] > 0xFFFF:  # a big-endian file
            order = ">"
        cursor = _Cursor(data, order)
        cursor.pos = 4
        version = cursor.take("I")
        count_fmt = "I" if version == 1 else "Q"
        cursor.take(count_fmt)  # tensor count
        n_kv = cursor.take(count_fmt)
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string().decode("utf-8", "replace")
            out[key] = _value(cursor, cursor.take("I"), want_array(key))
        return out


def _value(cursor: _Cursor, kind: int, want_array: bool) -> Any:
    if kind in _SCALARS:
        return cursor.take(_SCALARS[kind])
    if kind == _STRING:
        return cursor.string().decode("utf-8", "replace")
    if kind != _ARRAY:
        raise GGUFHeaderError(f"unknown GGUF value type {kind}")
    item_kind = cursor.take("I")
    count = cursor.take("Q")
    if item_kind == _STRING:
        cursor.skip_strings(count)
        return count
    if item_kind not in _SCALARS:
        raise GGUFHeaderError(f"unsupported GGUF array type {item_kind}")
    fmt = _SCALARS[item_kind]
    size = struct.calcsize(fmt) * count
    if cursor.pos + size > len(cursor.data):
        raise GGUFHeaderError("truncated GGUF array")
    if want_array:
        values = list(struct.unpack_from(f"{cursor.order}{count}{fmt}", cursor.data, cursor.pos))
        cursor.pos += size
        return values
    cursor.pos += size
    return count
