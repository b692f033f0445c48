"""What a converted grammar will cost llama.cpp per token, measured on the normalized schema
in linear time, and the documented limits a request's grammar must stay within.

llama.cpp's grammar keeps one parse stack per alternative still alive at the current
position and, when it constrains a step, checks the whole vocabulary against each stack
(``llama_grammar_reject_candidates``): a step costs about (live stacks) x (vocabulary).
The *width* estimated here is an upper bound on those stacks: an ``enum`` keeps every
value alive until their spellings differ, ``anyOf`` keeps every branch, an object keeps
each optional property that may come next, and a pattern whose repetition nests over a
variable-length body keeps every (outer copy, inner position) pair (see
:func:`ggufserve.grammar.pattern.json_safe_pattern`). The limits come from
``python -m tests.bench.grammar_cost`` (docs/security.md has its table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ggufserve.grammar.keywords import UnsupportedSchemaError

# Stacks alive at the start of a value of each primitive rule of the converter
# (number: sign or digit; boolean: true or false; an unconstrained object or array
# holds any JSON value: its value rule has 8 alternatives).
_PRIMITIVE_WIDTH = {"string": 1, "number": 2, "integer": 2, "boolean": 2, "null": 1}
_ANY_CONTAINER_WIDTH = 8


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on one grammar (a response schema, or all the tools of a request together).

    Attributes:
        max_width: Parse alternatives alive at one position (the estimate above), whole
            grammar. A full-vocabulary check costs ~25 ms plus ~1.3 ms per alternative
            on a 262k vocabulary (bench: enum 256: 334 ms, 1024: 1.3 s, 4096: 4.6 s);
            256 keeps the worst accepted check under the sampler's 0.5 s step bound.
        max_enum_values: Values of one ``enum`` (256: the ISO country codes fit).
        max_optional_properties: Optional properties of one object (the converter's
            rules for them grow with the square of their number: 64 convert in 4 ms,
            256 in 55 ms, 512 in 272 ms).
        max_pattern_width: Parse alternatives one ``pattern`` can keep alive
            (``(a{0,16}){0,16}``, 256 of them: 360 ms a check; 1024: 2.7 s).
        max_nodes: Schema nodes after normalization (each becomes one or more rules).
        max_literal_chars: Characters of every ``enum``/``const`` value together.
        max_ref_depth: Schema levels on one path, counted through ``$ref``s (the
            converter recurses along it).
    """

    max_width: int = 256
    max_enum_values: int = 256
    max_optional_properties: int = 128
    max_pattern_width: int = 128
    max_nodes: int = 4096
    max_literal_chars: int = 65_536
    max_ref_depth: int = 128


DEFAULT_LIMITS = GrammarLimits()
# For measuring (tests.bench.grammar_cost): nothing refused for cost.
UNBOUNDED = GrammarLimits(*(10**12 for _ in range(7)))


@dataclass
class CostTracker:
    """Per-document bookkeeping the normalizer fills while it walks (one pass, linear):
    where each normalized node came from, the widths known at creation (patterns),
    and the running totals the limits bound."""

    limits: GrammarLimits
    where: dict[int, tuple[str, str]]  # id(normalized node) -> (keyword, path)
    leaf_width: dict[int, int]  # id(normalized node) -> width known when it was made
    nodes: int = 0
    literal_chars: int = 0

    def count_node(self, path: str) -> None:
        self.nodes += 1
        if self.nodes > self.limits.max_nodes:
            raise UnsupportedSchemaError(
                "schema", path, f"takes the schema past {self.limits.max_nodes} nodes"
            )

    def count_literal(self, keyword: str, path: str, chars: int) -> None:
        self.literal_chars += chars
        if self.literal_chars > self.limits.max_literal_chars:
            limit = self.limits.max_literal_chars
            raise UnsupportedSchemaError(
                keyword, path, f"takes the enum/const text past {limit} characters"
            )

    def check_count(self, keyword: str, path: str, count: int, limit: int, what: str) -> None:
        if count > limit:
            raise UnsupportedSchemaError(keyword, path, f"has {count} {what}; at most {limit}")

    def record(self, node: dict[str, Any], keyword: str, path: str) -> dict[str, Any]:
        self.where[id(node)] = (keyword, path)
        return node


class WidthMeter:
    """Width of normalized schemas (see the module doc), each definition measured once.

    Raises (from :meth:`width`):
        UnsupportedSchemaError: a node whose width passes ``max_width`` (named by the
            keyword that makes it wide and its path), or a path through ``$ref``s deeper
            than ``max_ref_depth``.
    """

    def __init__(self, tracker: CostTracker, defs: dict[str, dict[str, Any]]):
        self._tracker = tracker
        self._defs = defs
        self._done: dict[str, int] = {}
        self._open: set[str] = set()

    def width(self, node: dict[str, Any], depth: int = 0) -> int:
        limits = self._tracker.limits
        keyword, path = self._tracker.where.get(id(node), ("schema", ""))
        if depth > limits.max_ref_depth:
            reason = f"nests deeper than {limits.max_ref_depth} levels through '$ref's"
            raise UnsupportedSchemaError("$ref", path, reason)
        width = self._node_width(node, depth)
        if width > limits.max_width:
            reason = (
                f"makes the grammar too wide: about {width} parse alternatives at one "
                f"position, at most {limits.max_width}"
            )
            raise UnsupportedSchemaError(keyword, path, reason)
        return width

    def _node_width(self, node: dict[str, Any], depth: int) -> int:
        known = self._tracker.leaf_width.get(id(node))
        if known is not None:
            return known
        if "$ref" in node:
            return self._ref_width(node["$ref"].rsplit("/", 1)[-1], depth)
        if "anyOf" in node:
            return sum(self.width(branch, depth + 1) for branch in node["anyOf"])
        if "enum" in node:
            return len(node["enum"])
        if "const" in node:
            return 1
        kind = node.get("type")
        if kind == "object":
            return self._object_width(node, depth)
        if kind == "array":
            if "prefixItems" in node:
                return max((self.width(i, depth + 1) for i in node["prefixItems"]), default=1)
            if "items" not in node:
                return _ANY_CONTAINER_WIDTH
            return self.width(node["items"], depth + 1) + 1
        return _PRIMITIVE_WIDTH.get(str(kind), _ANY_CONTAINER_WIDTH)

    def _object_width(self, node: dict[str, Any], depth: int) -> int:
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties is None and not isinstance(extra, dict):
            return _ANY_CONTAINER_WIDTH
        widths = [self.width(schema, depth + 1) for schema in (properties or {}).values()]
        if isinstance(extra, dict):
            widths.append(self.width(extra, depth + 1) + 1)
        optional = len(properties or {}) - len(node.get("required", ()))
        return max([optional + 1, *widths])

    def _ref_width(self, name: str, depth: int) -> int:
        if name in self._done:
            return self._done[name]
        if name in self._open:
            return 1  # recursion through an object or array: counted where it starts
        self._open.add(name)
        width = self.width(self._defs[name], depth + 1)
        self._open.discard(name)
        self._done[name] = width
        return width
