"""The JSON-schema keywords llama-cpp-python's SchemaConverter enforces, and the error
for the rest.

Read from ``SchemaConverter.visit`` (llama_cpp.llama_grammar, 0.3.36): one branch per
schema, taken in this order, each honouring only its own keywords: ``$ref`` |
``anyOf``/``oneOf`` | list ``type`` | ``const`` | ``enum`` | object (``properties``,
``required``, ``additionalProperties``) | ``allOf`` (lossy beyond one element) | array
(``items``/``prefixItems``, ``minItems``, ``maxItems``) | string ``pattern`` | ``format``
(uuid, date, time, date-time) | string ``minLength``/``maxLength`` | a primitive ``type``.
Everything else (``minimum``, ``not``, ``uniqueItems``, ...) it drops without a word.
"""

from __future__ import annotations

from typing import Any

ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly", "strict",
        # OpenAPI's hint for tagged unions: the oneOf branches already pin the tag.
        "discriminator",
    }
)  # fmt: skip
CONTAINERS = frozenset({"$defs", "definitions"})  # only reached through $ref
TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
FORMATS = ("date", "time", "date-time", "uuid")
GROUPS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("pattern", "format", "minLength", "maxLength"),
}
ENFORCED = frozenset(
    {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
    | {keyword for group in GROUPS.values() for keyword in group}
)
ANY_TYPES = ["string", "number", "boolean", "null", "object", "array"]
MAX_DEPTH = 64  # schema nesting levels
MAX_REPEAT = 1000  # one minLength/maxLength/minItems/maxItems; llama.cpp fails near 2000
MAX_TOTAL_REPEAT = 20_000  # all repetition bounds of one grammar: its size grows with them
_PY_TYPES: dict[str, Any] = {
    "string": str, "boolean": bool, "null": type(None), "object": dict, "array": list
}  # fmt: skip


class UnsupportedSchemaError(ValueError):
    """A JSON schema keyword that constrained decoding cannot enforce.

    Attributes:
        keyword: The JSON-schema keyword, e.g. ``"minimum"``.
        path: Where it is, dotted (``"properties.age"``; ``""`` for the root).
    """

    def __init__(self, keyword: str, path: str, reason: str = "cannot be enforced"):
        self.keyword = keyword
        self.path = path
        where = f"at '{path}'" if path else "at the schema root"
        super().__init__(f"JSON schema keyword '{keyword}' {where} {reason}.")


def join(path: str, *parts: str) -> str:
    """A dotted schema path: ``join("properties.a", "items")`` → ``"properties.a.items"``."""
    return ".".join(part for part in (path, *parts) if part)


def is_type(value: Any, type_name: str) -> bool:
    """Whether the JSON value ``value`` is of JSON-schema type ``type_name``."""
    if type_name in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return type_name == "number" or isinstance(value, int) or value.is_integer()
    return isinstance(value, _PY_TYPES[type_name])


def spellable(text: str) -> bool:
    """Whether SchemaConverter writes ``text`` (inside ``json.dumps``) as a correct GBNF
    literal: its escaping misses backslashes, and surrogate pairs break."""
    return not any(
        c in '"\\' or ord(c) < 0x20 or 0xD800 <= ord(c) <= 0xDFFF or ord(c) > 0xFFFF for c in text
    )
