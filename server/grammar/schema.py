"""JSON schema checks for llama-cpp-python's SchemaConverter: refuse every keyword it would
silently ignore (see :mod:`ggufserve.grammar.keywords`), and rewrite the rest into the shapes
it converts exactly.

The rewrite keeps exactly one converter branch's keywords per node, so the converter cannot
pick a different branch than the schema means; local ``$ref`` targets become
``#/$defs/def<N>`` (unique across documents, so several tools' ``$defs`` never clash and no
property rule can shadow a definition); annotations are dropped.
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import unquote

from ggufserve.grammar.cost import DEFAULT_LIMITS, CostTracker, GrammarLimits, WidthMeter
from ggufserve.grammar.keywords import (
    ANNOTATIONS,
    ANY_TYPES,
    CONTAINERS,
    ENFORCED,
    FORMATS,
    GROUPS,
    MAX_DEPTH,
    MAX_REPEAT,
    MAX_TOTAL_REPEAT,
    TYPES,
    UnsupportedSchemaError,
    is_type,
    join,
    spellable,
)
from ggufserve.grammar.pattern import PatternError, json_safe_pattern

_HINTS = {
    "nullable": "is OpenAPI, not JSON schema; use anyOf with {'type': 'null'}",
    "additionalItems": "is not supported; use prefixItems",
}
_ABSENT = object()
# A JSON pointer array index (RFC 6901): ASCII digits, no leading zero; 10 digits at most.
_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")


def check_schema(schema: dict[str, Any]) -> None:
    """Check that the grammar can enforce every keyword of ``schema``.

    Raises:
        UnsupportedSchemaError: for the first keyword SchemaConverter would ignore or
            mistranslate: an unknown or unenforced keyword (``minimum``, ``not``,
            ``nullable``, ...), keywords mixed with ``$ref``/``anyOf``/``oneOf``/``enum``/
            ``const`` or across types, ``allOf`` with several entries, an unsupported
            ``format`` or ``pattern``, ``pattern`` with ``minLength``/``maxLength``, a
            non-local or unresolvable ``$ref``, recursion with no object or array in
            between, a ``required`` name missing from ``properties``, strings the grammar
            cannot spell (quotes, backslashes, controls or non-BMP characters in property
            names and ``enum``/``const`` values), repetition bounds above 1000 (20000 in
            all), nesting deeper than 64, a keyword whose value has the wrong JSON type
            (``required`` not a list of strings, ``type`` not a type name or a list of
            them, ...), or a grammar past the cost limits of
            :class:`ggufserve.grammar.cost.GrammarLimits` (enum size, optional properties,
            pattern width, parse alternatives alive at once, nodes, ``$ref`` depth).
            Every check is one pass over the schema (linear time).
    """
    normalizer = SchemaNormalizer()
    normalizer.document(normalizer.add(schema, ""))


class SchemaNormalizer:
    """Checks JSON schemas and rewrites them for SchemaConverter (see the module doc).

    Add one or more documents with :meth:`add` (each resolves its own local ``$ref``), then
    build the converter's input with :meth:`document`. ``limits`` bound all the documents
    together. One instance per grammar; instances share no state (thread-safe).
    """

    def __init__(self, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
        self.tracker = CostTracker(limits, where={}, leaf_width={})
        self.defs: dict[str, dict[str, Any]] = {}
        self._def_paths: dict[str, str] = {}
        self._names: dict[tuple[int, tuple[str, ...]], str] = {}
        self._pending: list[tuple[str, Any, str, int, Any]] = []
        self._doc_paths: dict[int, str] = {}
        self._docs: list[Any] = []  # keeps each document alive, so its id() stays unique
        self._repeats_left = MAX_TOTAL_REPEAT

    def add(self, schema: Any, path: str) -> dict[str, Any]:
        """Normalize one document found at ``path``; return its normalized root.

        Raises:
            UnsupportedSchemaError: as :func:`check_schema` (paths start with ``path``).
        """
        self._docs.append(schema)
        self._doc_paths[id(schema)] = path
        root = self.node(schema, path, 0, schema, "")
        while self._pending:
            name, target, def_path, depth, doc = self._pending.pop()
            self.defs[name] = self.node(target, def_path, depth, doc, "$ref")
        return root

    def document(self, root: dict[str, Any]) -> dict[str, Any]:
        """The converter's input: ``root`` with every definition under ``$defs``.

        Raises:
            UnsupportedSchemaError: a ``$ref`` cycle with no object or array in between
                (a left-recursive grammar llama.cpp refuses), or a grammar wider than
                the limits allow (see :class:`ggufserve.grammar.cost.WidthMeter`).
        """
        self._check_cycles()
        WidthMeter(self.tracker, self.defs).width(root)
        if "$ref" in root:
            # resolve_refs skips the siblings of a $ref node: keep $defs off that node.
            root = {"anyOf": [root]}
        return {**root, "$defs": self.defs} if self.defs else root

    def literal(self, value: Any, keyword: str, path: str) -> None:
        """Check that an ``enum``/``const`` value converts to a correct literal.

        Raises:
            UnsupportedSchemaError: non-finite numbers, strings :func:`spellable` refuses,
                objects with a ``$ref`` key (resolve_refs would rewrite them), values
                that are not JSON, nested deeper than 64 levels, or enum/const text past
                the limits.
        """
        stack = [(value, 0)]  # iterative: a value nested thousands deep is no RecursionError
        while stack:
            item, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise UnsupportedSchemaError(keyword, path, f"nests deeper than {MAX_DEPTH}")
            if isinstance(item, str):
                if not spellable(item):
                    raise UnsupportedSchemaError(
                        keyword, path, "holds quotes, backslashes, control or non-BMP characters"
                    )
                self.tracker.count_literal(keyword, path, len(item) + 2)
            elif isinstance(item, float) and not math.isfinite(item):
                raise UnsupportedSchemaError(keyword, path, "holds a non-finite number")
            elif isinstance(item, dict):
                if "$ref" in item:
                    raise UnsupportedSchemaError(keyword, path, "holds an object with a '$ref' key")
                stack += [(part, depth + 1) for pair in item.items() for part in pair]
            elif isinstance(item, list):
                stack += [(part, depth + 1) for part in item]
            elif item is not None and not isinstance(item, (bool, int, float)):
                raise UnsupportedSchemaError(keyword, path, "holds a value that is not JSON")
            else:
                self.tracker.count_literal(keyword, path, len(repr(item)))

    def node(self, node: Any, path: str, depth: int, doc: Any, via: str) -> dict[str, Any]:
        """Normalize one schema node (``via``: the keyword that led here, for errors)."""
        self.tracker.count_node(path)
        out = self._node(node, path, depth, doc, via)
        return self.tracker.record(out, _construct(node, out), path)

    def _node(self, node: Any, path: str, depth: int, doc: Any, via: str) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise UnsupportedSchemaError(via, path, f"nests deeper than {MAX_DEPTH} levels")
        if node is True:
            return {"type": list(ANY_TYPES)}
        if not isinstance(node, dict):
            reason = "is the false schema" if node is False else "is not a schema object"
            raise UnsupportedSchemaError(via or "schema", path, reason)
        if "$id" in node and node is not doc:
            # A nested $id re-bases the '#/...' references under it.
            raise UnsupportedSchemaError("$id", path, "is only supported at the schema root")
        keys = [k for k in node if k not in ANNOTATIONS and k not in CONTAINERS]
        for key in keys:
            if key not in ENFORCED:
                raise UnsupportedSchemaError(key, path, _HINTS.get(key, "cannot be enforced"))
        if "allOf" in node:
            entries = node["allOf"]
            if not isinstance(entries, list) or len(entries) != 1:
                raise UnsupportedSchemaError("allOf", path, "is only supported with one entry")
            _only(keys, "allOf", path)
            return self.node(entries[0], join(path, "allOf[0]"), depth + 1, doc, "allOf")
        if "$ref" in node:
            _only(keys, "$ref", path)
            return {"$ref": self._ref(node["$ref"], path, doc)}
        if "anyOf" in node or "oneOf" in node:
            return self._union(node, keys, path, depth, doc)
        if "const" in node or "enum" in node:
            return self._constant(node, keys, path)
        kind = node.get("type")
        if isinstance(kind, list):
            return self._type_list(node, keys, path, depth, doc)
        if kind is not None and (not isinstance(kind, str) or kind not in TYPES):
            raise UnsupportedSchemaError("type", path, f"has an unknown type {kind!r}")
        kind = kind or _infer_type(keys, path)
        if kind is None:
            return {"type": list(ANY_TYPES)}
        for key in keys:
            if key != "type" and key not in GROUPS.get(kind, ()):
                raise UnsupportedSchemaError(key, path, f"does not apply to type '{kind}'")
        if kind == "object":
            return self._object(node, path, depth, doc)
        if kind == "array":
            return self._array(node, path, depth, doc)
        if kind == "string":
            return self._string(node, path)
        return {"type": kind}

    def _union(
        self, node: dict[str, Any], keys: list[str], path: str, depth: int, doc: Any
    ) -> dict[str, Any]:
        keyword = "oneOf" if "oneOf" in node else "anyOf"
        _only(keys, keyword, path)
        branches = node[keyword]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchemaError(keyword, path, "must be a non-empty list")
        # oneOf becomes anyOf: exclusivity is not enforced (tagged unions are exclusive).
        return {
            "anyOf": [
                self.node(branch, join(path, f"{keyword}[{i}]"), depth + 1, doc, keyword)
                for i, branch in enumerate(branches)
            ]
        }

    def _constant(self, node: dict[str, Any], keys: list[str], path: str) -> dict[str, Any]:
        keyword = "const" if "const" in node else "enum"
        _only([k for k in keys if k != "type"], keyword, path)
        values = [node["const"]] if keyword == "const" else node["enum"]
        if not isinstance(values, list) or not values:
            raise UnsupportedSchemaError("enum", path, "must be a non-empty list")
        limit = self.tracker.limits.max_enum_values
        self.tracker.check_count("enum", path, len(values), limit, "values")
        kinds = node.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if kinds is not None and not _type_names(kinds):
            raise UnsupportedSchemaError("type", path, "must be a type name or a list of them")
        for value in values:
            self.literal(value, keyword, path)
            if kinds is not None and not any(k in TYPES and is_type(value, k) for k in kinds):
                raise UnsupportedSchemaError(keyword, path, f"has {value!r}, not of its 'type'")
        return {"const": values[0]} if keyword == "const" else {"enum": list(values)}

    def _type_list(
        self, node: dict[str, Any], keys: list[str], path: str, depth: int, doc: Any
    ) -> dict[str, Any]:
        kinds = node["type"]
        if not _type_names(kinds) or len(set(kinds)) != len(kinds):
            raise UnsupportedSchemaError("type", path, "must list distinct JSON types")
        for key in keys:
            if key != "type" and not any(key in GROUPS.get(k, ()) for k in kinds):
                raise UnsupportedSchemaError(key, path, f"does not apply to types {kinds}")
        # The converter would drop every other keyword: one branch per type keeps them.
        branches = [
            {"type": k, **{key: node[key] for key in GROUPS.get(k, ()) if key in node}}
            for k in kinds
        ]
        if len(branches) == 1:
            return self.node(branches[0], path, depth, doc, "type")
        return {"anyOf": [self.node(b, path, depth, doc, "type") for b in branches]}

    def _object(self, node: dict[str, Any], path: str, depth: int, doc: Any) -> dict[str, Any]:
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise UnsupportedSchemaError("properties", path, "must be an object")
        out_properties = {}
        for name, schema in properties.items():
            if name == "$ref" or not spellable(name):
                raise UnsupportedSchemaError(
                    "properties", path, f"has a property name the grammar cannot spell: {name!r}"
                )
            sub_path = join(path, "properties", name)
            out_properties[name] = self.node(schema, sub_path, depth + 1, doc, "properties")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(n, str) for n in required):
            raise UnsupportedSchemaError("required", path, "must be a list of property names")
        for name in required:
            if name not in out_properties:
                raise UnsupportedSchemaError("required", path, f"names {name!r}, not a property")
        optional = len(out_properties.keys() - set(required))
        limit = self.tracker.limits.max_optional_properties
        self.tracker.check_count(
            "properties", path, optional, limit, "optional properties (make more required)"
        )
        extra = node.get("additionalProperties", _ABSENT)
        if "properties" not in node and (extra is _ABSENT or extra is True):
            return {"type": "object"}  # any object
        if not (extra is _ABSENT or isinstance(extra, (bool, dict))):
            raise UnsupportedSchemaError("additionalProperties", path, "must be a bool or schema")
        # Objects with properties are closed: the converter's extra keys could repeat a
        # declared one with any value. Never writing extras is still valid (OpenAI strict).
        out: dict[str, Any] = {
            "type": "object",
            "properties": out_properties,
            "required": list(dict.fromkeys(required)),
        }
        if isinstance(extra, dict):
            extra_schema = self.node(
                extra, join(path, "additionalProperties"), depth + 1, doc, "additionalProperties"
            )
            if not out_properties:
                out["additionalProperties"] = extra_schema
        return out

    def _array(self, node: dict[str, Any], path: str, depth: int, doc: Any) -> dict[str, Any]:
        items = node.get("items", _ABSENT)
        prefix = node.get("prefixItems", _ABSENT)
        if isinstance(items, list):  # draft 4 tuple
            if prefix is not _ABSENT:
                raise UnsupportedSchemaError("prefixItems", path, "cannot be combined with a list")
            prefix, items = items, _ABSENT
        if prefix is not _ABSENT:
            if not isinstance(prefix, list):
                raise UnsupportedSchemaError("prefixItems", path, "must be a list")
            # The converter allows exactly the listed items: 'items' may only say so.
            if items not in (_ABSENT, True, False, {}):
                raise UnsupportedSchemaError("items", path, "cannot be combined with prefixItems")
            for key in ("minItems", "maxItems"):
                if key in node:
                    raise UnsupportedSchemaError(key, path, "cannot be combined with prefixItems")
            entries = [
                self.node(item, join(path, f"prefixItems[{i}]"), depth + 1, doc, "prefixItems")
                for i, item in enumerate(prefix)
            ]
            return {"type": "array", "prefixItems": entries}
        if items is False:
            raise UnsupportedSchemaError("items", path, "false is not supported")
        low, high = self._bounds(node, "minItems", "maxItems", path)
        if items is _ABSENT and low == 0 and high is None:
            return {"type": "array"}
        item_schema = {} if items is _ABSENT else items
        out: dict[str, Any] = {
            "type": "array",
            "items": self.node(item_schema, join(path, "items"), depth + 1, doc, "items"),
        }
        if low:
            out["minItems"] = low
        if high is not None:
            out["maxItems"] = high
        return out

    def _string(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        for keyword in ("pattern", "format"):
            if keyword in node:
                _only([k for k in GROUPS["string"] if k in node], keyword, path)
        if "pattern" in node:
            if not isinstance(node["pattern"], str):
                raise UnsupportedSchemaError("pattern", path, "must be a string")
            try:
                pattern, repeats, shape = json_safe_pattern(node["pattern"])
            except PatternError as exc:
                raise UnsupportedSchemaError("pattern", path, str(exc)) from None
            self._spend("pattern", path, repeats)
            limit = self.tracker.limits.max_pattern_width
            what = "parse alternatives alive at once (nested repetition)"
            self.tracker.check_count("pattern", path, shape.width, limit, what)
            pattern_node = {"type": "string", "pattern": pattern}
            self.tracker.leaf_width[id(pattern_node)] = shape.width
            return pattern_node
        if "format" in node:
            if not isinstance(node["format"], str) or node["format"] not in FORMATS:
                raise UnsupportedSchemaError(
                    "format", path, f"{node['format']!r} is not one of {', '.join(FORMATS)}"
                )
            return {"type": "string", "format": node["format"]}
        low, high = self._bounds(node, "minLength", "maxLength", path)
        out: dict[str, Any] = {"type": "string"}
        if low:
            out["minLength"] = low
        if high is not None:
            out["maxLength"] = high
        return out

    def _bounds(
        self, node: dict[str, Any], low_key: str, high_key: str, path: str
    ) -> tuple[int, int | None]:
        values = []
        for key in (low_key, high_key):
            value = node.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UnsupportedSchemaError(key, path, "must be a non-negative integer")
                if value > MAX_REPEAT:
                    raise UnsupportedSchemaError(key, path, f"is above {MAX_REPEAT}")
            values.append(value)
        low, high = values[0] or 0, values[1]
        if high is not None and high < low:
            raise UnsupportedSchemaError(high_key, path, f"is below {low_key}")
        self._spend(high_key if high is not None else low_key, path, max(low, high or 0))
        return low, high

    def _spend(self, keyword: str, path: str, repeats: int) -> None:
        self._repeats_left -= repeats
        if self._repeats_left < 0:
            raise UnsupportedSchemaError(
                keyword, path, f"takes the schema's repetition bounds past {MAX_TOTAL_REPEAT}"
            )

    def _ref(self, ref: Any, path: str, doc: Any) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedSchemaError("$ref", path, "must be a local JSON pointer ('#/...')")
        pointer = ref[2:].split("/") if ref != "#" else []
        segments = tuple(unquote(p).replace("~1", "/").replace("~0", "~") for p in pointer)
        key = (id(doc), segments)
        if key not in self._names:
            target = doc
            for segment in segments:
                if isinstance(target, dict) and segment in target:
                    target = target[segment]
                elif (
                    isinstance(target, list)
                    and _INDEX.fullmatch(segment)
                    and int(segment) < len(target)
                ):
                    target = target[int(segment)]
                else:
                    raise UnsupportedSchemaError("$ref", path, f"{ref!r} does not resolve")
            name = f"def{len(self._names)}"
            self._names[key] = name
            # Errors inside a definition point at the definition, under the document's path.
            def_path = join(self._doc_paths[id(doc)], *segments)
            self._def_paths[name] = def_path
            self._pending.append((name, target, def_path, len(segments), doc))
        return f"#/$defs/{self._names[key]}"

    def _check_cycles(self) -> None:
        # Peel definitions whose heads are all peeled (Kahn's algorithm, linear); a
        # definition left over reaches a cycle through its heads.
        heads = {name: _heads(schema) for name, schema in self.defs.items()}
        waiting = {name: len(names) for name, names in heads.items()}
        users: dict[str, list[str]] = {name: [] for name in heads}
        for name, names in heads.items():
            for head in names:
                users[head].append(name)
        ready = [name for name, count in waiting.items() if count == 0]
        while ready:
            for user in users[ready.pop()]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
        left = {name for name, count in waiting.items() if count}
        if left:
            name, seen = next(n for n in self.defs if n in left), set()
            while name not in seen:  # walk until a definition repeats: it is on the cycle
                seen.add(name)
                name = next(head for head in heads[name] if head in left)
            reason = "recurses with no object or array between"
            raise UnsupportedSchemaError("$ref", self._def_paths[name], reason)


def _index(segment: str) -> int:
    """A JSON pointer segment as an array index, or -1 when it is not one."""
    return int(segment) if _INDEX.fullmatch(segment) else -1


def _only(keys: list[str], keyword: str, path: str) -> None:
    for key in keys:
        if key != keyword:
            raise UnsupportedSchemaError(key, path, f"cannot be combined with '{keyword}'")


def _infer_type(keys: list[str], path: str) -> str | None:
    kinds = [kind for kind, group in GROUPS.items() if any(k in group for k in keys)]
    if len(kinds) > 1:
        clash = next(k for k in keys if k in GROUPS[kinds[1]])
        raise UnsupportedSchemaError(clash, path, "mixes keywords of several types; set 'type'")
    return kinds[0] if kinds else None


def _heads(schema: dict[str, Any]) -> list[str]:
    """Definitions a schema can start with before consuming any text (distinct, in order)."""
    found: dict[str, None] = {}
    stack = [schema]
    while stack:
        node = stack.pop()
        if "$ref" in node:
            found[node["$ref"].rsplit("/", 1)[-1]] = None
        stack += reversed(node.get("anyOf", ()))
    return list(found)


def _type_names(kinds: Any) -> bool:
    """Whether ``kinds`` is a non-empty list of JSON-schema type names."""
    return (
        isinstance(kinds, list)
        and bool(kinds)
        and all(isinstance(k, str) and k in TYPES for k in kinds)
    )


def _construct(node: Any, out: dict[str, Any]) -> str:
    """The keyword that makes a normalized node what it is (named when it is too costly)."""
    for keyword in ("oneOf", "anyOf", "enum", "const", "$ref", "pattern"):
        if isinstance(node, dict) and keyword in node:
            return keyword
    if "anyOf" in out:
        return "type"
    return {"object": "properties", "array": "items"}.get(str(out.get("type")), "type")
