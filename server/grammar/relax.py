"""Non-strict tool schemas: the part of a JSON schema the grammar can enforce.

OpenAI checks a function's arguments against its schema only with ``strict: true``;
without it the schema guides the model and nothing more. Agents send such schemas with
validation keywords the grammar cannot enforce (Claude Code's tools: ``minimum``,
``maximum``, ``exclusiveMinimum``, ``propertyNames``; others ``format: uri``...). For a
non-strict tool those keywords are left out, so the arguments keep the schema's structure
(properties, required, types, enums) and the request is served; ``strict: true`` keeps
every keyword and refuses the unenforceable ones (:mod:`ggufserve.grammar.schema`).
"""

from __future__ import annotations

from typing import Any

from ggufserve.grammar.keywords import (
    ANNOTATIONS,
    CONTAINERS,
    ENFORCED,
    FORMATS,
    GROUPS,
    MAX_DEPTH,
    MAX_REPEAT,
    TYPES,
)
from ggufserve.grammar.pattern import PatternError, json_safe_pattern

# Keywords that pick one shape and take no siblings but annotations (the normalizer's rule).
_HEADS = ("allOf", "$ref", "anyOf", "oneOf", "const", "enum")
_COMBINATORS = ("allOf", "anyOf", "oneOf")
_BOUNDS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})
# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
_ONE = ("items", "additionalProperties")
_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAPS = ("properties", "$defs", "definitions")


def relaxed(schema: Any, depth: int = 0) -> Any:
    """``schema`` without what the grammar cannot enforce: unknown and validation-only
    keywords (``minimum``, ``not``, ``uniqueItems``, ``propertyNames``...), a ``format``
    other than date / time / date-time / uuid, a ``pattern`` the grammar cannot follow
    (or one beside ``minLength``/``maxLength``), a length or item bound that is not an
    integer from 0 to 1000 (the grammar spells bounds out), keywords of another type than
    the node's,
    and keywords beside a ``$ref`` / ``anyOf`` / ``oneOf`` / ``allOf`` / ``enum`` /
    ``const``. What is left is checked as usual (cost limits, ``$ref`` resolution...).

    Linear in the schema's size; below ``MAX_DEPTH`` levels (deeper nodes are returned as
    they are, for the normalizer to refuse). A new object: ``schema`` is not changed.
    """
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return schema
    kept = {key: value for key, value in schema.items() if key in ANNOTATIONS}
    containers = {
        key: _children(key, value, depth) for key, value in schema.items() if key in CONTAINERS
    }
    head = next((key for key in _HEADS if key in schema), None)
    if head in _COMBINATORS and ("type" in schema or "properties" in schema):
        head = None  # a typed node with anyOf/oneOf/allOf beside: those only validate it
    if head is not None:
        keep = {head, "type"} & schema.keys() if head in ("const", "enum") else {head}
    else:
        keep = {key for key in schema if key in ENFORCED and key not in _COMBINATORS}
        kinds = schema.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if isinstance(kinds, list) and all(isinstance(k, str) and k in TYPES for k in kinds):
            keep &= {"type"}.union(*(GROUPS.get(k, ()) for k in kinds))
        if "format" in keep and schema.get("format") not in FORMATS:
            keep.discard("format")
        if "pattern" in keep and not _followable(schema):
            keep.discard("pattern")
        # A bound the grammar would spell out rule by rule past its limit: left unbounded.
        keep -= {key for key in _BOUNDS & keep if not _spellable_bound(schema[key])}
        if "pattern" in keep:
            keep -= {"format", "minLength", "maxLength"}
        elif "format" in keep:
            keep -= {"minLength", "maxLength"}
    kept.update({key: _children(key, schema[key], depth) for key in keep})
    return {**kept, **containers}


def _spellable_bound(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REPEAT


def _followable(schema: dict[str, Any]) -> bool:
    pattern = schema.get("pattern")
    if not isinstance(pattern, str) or "minLength" in schema or "maxLength" in schema:
        return False
    try:
        json_safe_pattern(pattern)
    except PatternError:
        return False
    return True


def _children(key: str, value: Any, depth: int) -> Any:
    """A keyword's value with its subschemas relaxed."""
    if key in _ONE and not isinstance(value, list):
        return relaxed(value, depth + 1)
    if (key in _LISTS or key == "items") and isinstance(value, list):
        return [relaxed(item, depth + 1) for item in value]
    if key in _MAPS and isinstance(value, dict):
        return {name: relaxed(item, depth + 1) for name, item in value.items()}
    return value
