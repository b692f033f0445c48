"""Checked JSON schemas → GBNF through llama-cpp-python's SchemaConverter, and the tool-call
grammars built around it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, SPACE_RULE, SchemaConverter

from ggufserve.grammar.cost import DEFAULT_LIMITS, GrammarLimits
from ggufserve.grammar.keywords import ANY_TYPES, UnsupportedSchemaError, join, spellable
from ggufserve.grammar.relax import relaxed
from ggufserve.grammar.schema import SchemaNormalizer

# The converter's string character admits raw control characters, which JSON forbids
# (json.loads rejects them); llama.cpp's own converter later excluded them the same way.
_CHAR_RULE = "char ::= " + PRIMITIVE_RULES["char"].content
_JSON_CHAR_RULE = _CHAR_RULE.replace('[^"\\\\]', '[^"\\\\\\x00-\\x1F]', 1)
if _JSON_CHAR_RULE == _CHAR_RULE:
    raise ImportError("llama_cpp.llama_grammar's 'char' rule changed: review ggufserve.grammar")

# The converter allows at most one space between JSON tokens. Tool calls may also be
# pretty-printed (models do; lazy triggers match newlines), as llama.cpp's newer converter
# allows: a space, or one or two newlines and up to 20 spaces/tabs of indentation.
# Structured outputs keep the compact form: small models ramble once newlines are allowed.
_SPACE_RULE = "space ::= " + SPACE_RULE
_PRETTY_SPACE_RULE = 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}'

LEAD_WHITESPACE = 8  # most whitespace characters allowed after `lead`
_SCHEMA_RULE = "schema"  # rule-name prefix of a converted response schema
_CALL_RULE = "call"  # rule-name prefix of a converted tool call


def convert(document: dict[str, Any], name: str, *, pretty: bool = False) -> tuple[str, str]:
    """Run SchemaConverter on a normalized document; return (rules, top rule name).
    ``pretty`` allows newlines and indentation between JSON tokens.

    The top rule is named ``name`` (never ``root``), so callers can wrap it.

    Raises:
        UnsupportedSchemaError: the converter failed anyway (a gap in the checks).
    """
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(copy.deepcopy(document), "schema")
        top = converter.visit(resolved, name)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UnsupportedSchemaError("schema", "", "could not be converted") from exc
    rules = converter.format_grammar().replace(_CHAR_RULE, _JSON_CHAR_RULE)
    return (rules.replace(_SPACE_RULE, _PRETTY_SPACE_RULE) if pretty else rules), top


def json_schema_gbnf(schema: dict[str, Any], *, limits: GrammarLimits = DEFAULT_LIMITS) -> str:
    """GBNF (root rule ``root``) for JSON text that is an instance of ``schema``.

    Objects with ``properties`` are closed (extra keys are never written, whatever
    ``additionalProperties`` allows) and keep the schema's property order, required ones
    first; strings never hold raw control characters; whitespace is at most one space
    between tokens. The output is always valid for ``schema``, sometimes narrower.

    Thread-safe: every call builds its own state.

    Raises:
        UnsupportedSchemaError: as :func:`ggufserve.grammar.check_schema` (with ``limits``).
    """
    normalizer = SchemaNormalizer(limits)
    document = normalizer.document(normalizer.add(schema, ""))
    rules, top = convert(document, _SCHEMA_RULE)
    return f"root ::= {top}\n{rules}\n"


# Any JSON object (response_format json_object).
JSON_OBJECT_GBNF = json_schema_gbnf({"type": "object"})


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes tool calls around each call's JSON object.

    Attributes:
        arguments_key: Key of the arguments object: ``"arguments"`` (Qwen) or
            ``"parameters"`` (Gemma).
        call_prefix: Text before each call's JSON (``"<tool_call>\\n"``); with
            ``json_list``, before the whole payload.
        call_suffix: Text after each call's JSON (``"\\n</tool_call>"``); with
            ``json_list``, after the whole payload.
        separator: Text between calls when several (``"\\n"``); unused with ``json_list``,
            whose calls are separated by JSON commas.
        json_list: Several calls form a JSON list ``[call, call]``; one call may be a bare
            object or a one-element list.
        closing: Optional text allowed after the last call (``"\\n```"``).
    """

    arguments_key: str
    call_prefix: str
    call_suffix: str
    separator: str
    json_list: bool
    closing: str = ""


def tool_calls_gbnf(
    tools: list[dict[str, Any]],
    syntax: CallSyntax,
    *,
    max_calls: int = 1,
    lead: str = "",
    limits: GrammarLimits = DEFAULT_LIMITS,
) -> str:
    """GBNF for 1 to ``max_calls`` tool calls in ``syntax``.

    Each call's JSON is exactly ``{"name": <a tool name>, "<arguments_key>": <arguments>}``
    (name first), the arguments following that tool's ``parameters`` schema as in
    :func:`json_schema_gbnf`. A tool without ``parameters`` takes no arguments: ``{}``
    (OpenAI's meaning); ``parameters: {}`` accepts any object. A function without
    ``strict: true`` is held to the part of its schema the grammar can enforce (see
    :func:`ggufserve.grammar.relax.relaxed`); a strict one to all of it, or refused.

    Args:
        tools: OpenAI tool dicts ``{"type": "function", "function": {"name", "parameters"}}``.
        syntax: The family's call syntax.
        max_calls: Most calls in one reply (parallel calls when above 1); bounded so a
            model that repeats its call cannot loop to ``max_tokens``.
        lead: Literal text that must come first (e.g. ``"</think>"``), followed by up to
            8 spaces, tabs or newlines.
        limits: Cost bounds for all the tools together (one grammar).

    Raises:
        UnsupportedSchemaError: no tools; a tool that is not a function, has no usable
            name (empty, repeated, or with quotes, backslashes or control characters), or
            whose ``parameters`` is not an object schema; or anything
            :func:`ggufserve.grammar.check_schema` refuses in a strict function's
            ``parameters`` (in another's, what it refuses after relaxing; paths start
            with ``tools[i].function.parameters``), or tools past ``limits`` together.
    """
    document = _calls_document(tools, syntax.arguments_key, limits)
    rules, top = convert(document, _CALL_RULE, pretty=True)
    return _wrap_calls(rules, top, syntax, max_calls=max_calls, lead=lead)


def check_tools(tools: list[dict[str, Any]], *, limits: GrammarLimits = DEFAULT_LIMITS) -> None:
    """Every check of :func:`tool_calls_gbnf` (one linear pass; no grammar is written):
    none of them depends on a family's call syntax, so they run before a model is chosen.

    Raises:
        UnsupportedSchemaError: as :func:`tool_calls_gbnf`.
    """
    _calls_document(tools, "arguments", limits)


def _calls_document(
    tools: list[dict[str, Any]], arguments_key: str, limits: GrammarLimits
) -> dict[str, Any]:
    """The checked schema of one call to any of ``tools`` (see :func:`tool_calls_gbnf`)."""
    if not tools:
        raise UnsupportedSchemaError("tools", "tools", "must list at least one function")
    normalizer = SchemaNormalizer(limits)
    record = normalizer.tracker.record
    calls = []
    names: set[str] = set()
    for index, tool in enumerate(tools):
        name, parameters = _function(tool, index, names)
        arguments = normalizer.add(parameters, f"tools[{index}].function.parameters")
        if arguments.get("type") == ANY_TYPES:  # parameters {}: any object
            arguments = {"type": "object"}
        call = {"name": {"const": name}, arguments_key: arguments}
        path = f"tools[{index}].function"
        call = {key: record(value, "function", path) for key, value in call.items()}
        calls.append(
            record({"type": "object", "properties": call, "required": list(call)}, "function", path)
        )
    return normalizer.document(record({"anyOf": calls}, "tools", "tools"))


def _function(tool: Any, index: int, names: set[str]) -> tuple[str, Any]:
    """A tool dict's (name, parameters schema); records the name in ``names``."""
    path = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise UnsupportedSchemaError("type", path, "must be a 'function' tool")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise UnsupportedSchemaError("function", path, "must be an object")
    name = function.get("name")
    if not isinstance(name, str):
        raise UnsupportedSchemaError("name", join(path, "function"), "must be a string")
    if not name or not spellable(name) or name in names:
        reason = "repeats another tool's name" if name in names else "is missing or unusable"
        raise UnsupportedSchemaError("name", join(path, "function"), reason)
    names.add(name)
    parameters = function.get("parameters")
    if parameters is None:
        return name, {"type": "object", "properties": {}}
    if isinstance(parameters, dict) and parameters.get("type", "object") != "object":
        raise UnsupportedSchemaError(
            "type", join(path, "function.parameters"), "must be 'object' for function arguments"
        )
    # Only a strict function promises its schema in full (OpenAI's meaning of ``strict``).
    return name, parameters if function.get("strict") is True else relaxed(parameters)


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    escapes = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    body = "".join(escapes.get(c) or (f"\\x{ord(c):02X}" if ord(c) < 0x20 else c) for c in text)
    return f'"{body}"'


def _wrap_calls(rules: str, top: str, syntax: CallSyntax, *, max_calls: int, lead: str) -> str:
    """Root rule around converted call objects (rule ``top``): lead, prefix/suffix, list
    or separator, optional closing."""
    prefix = _literal(syntax.call_prefix) if syntax.call_prefix else ""
    suffix = _literal(syntax.call_suffix) if syntax.call_suffix else ""
    extra = []
    if syntax.json_list:
        more = f' ("," space {top}){{0,{max_calls - 1}}}' if max_calls > 1 else ""
        payload = f'({top} | "[" space {top}{more} "]" space)'
        body = " ".join(part for part in (prefix, payload, suffix) if part)
    else:
        extra.append("tool-call ::= " + " ".join(p for p in (prefix, top, suffix) if p))
        sep = f"{_literal(syntax.separator)} " if syntax.separator else ""
        body = f"tool-call ({sep}tool-call){{0,{max_calls - 1}}}" if max_calls > 1 else "tool-call"
    head = f"{_literal(lead)} [ \\t\\n]{{0,{LEAD_WHITESPACE}}} " if lead else ""
    tail = f" ({_literal(syntax.closing)})?" if syntax.closing else ""
    return "\n".join([f"root ::= {head}{body}{tail}", *extra, rules]) + "\n"
