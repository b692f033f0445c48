"""Gemma 3: JSON function calls as Google's Gemma function-calling guide documents them.

The shipped ``gemma3_tools.jinja`` tells the model to reply ONLY with
``{"name": <fn>, "parameters": {...}}``, or a JSON list of those for several calls.
The parser also accepts what the model really emits besides: ``"arguments"`` instead of
``"parameters"``, the JSON inside a ```` ```json ```` / ```` ```tool_code ```` / plain
```` ``` ```` fence, and Python-call style (``[get_weather(city="Paris")]`` bare, or
``get_weather(city="Paris")`` in a ```` ```tool_code ```` fence), keyword literals only.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Set

from ggufserve.families.base import (
    Family,
    ImagePlaceholder,
    ToolCall,
    arguments_json,
    call_from_object,
    new_call_id,
)
from ggufserve.families.reasoning import PARTIAL, find_marker
from ggufserve.grammar import CallSyntax

GEMMA_ARGUMENTS_KEY = "parameters"
# Keys accepted for the arguments object when parsing, preferred first.
GEMMA_ARGUMENT_KEYS = (GEMMA_ARGUMENTS_KEY, "arguments")

_JSON_MARKERS = ('{ "name"', '[ { "name"')
# A space in a marker matches any whitespace run (reasoning.marker_at).
_FENCE_MARKERS = (
    "```tool_code",
    *(f"```{lang} {marker}" for lang in ("", "json") for marker in _JSON_MARKERS),
)
_FENCE = re.compile(r"```([A-Za-z_]*)")
_STRAY_FENCE = re.compile(r"\s*```(?![A-Za-z_`])")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Bound on how many "]" a bracketed Python call list is tried against (each is one parse).
_MAX_BRACKET_TRIES = 32


class Gemma3(Family):
    """Gemma 3's JSON (and Python-style) calls (see module doc)."""

    name = "gemma3"
    architectures = ("gemma3",)
    # A constrained reply is a JSON list of calls (or one bare call); a closing fence may
    # follow, for a model that opened one before the grammar started.
    call_syntax = CallSyntax(
        arguments_key=GEMMA_ARGUMENTS_KEY,
        call_prefix="",
        call_suffix="",
        separator=", ",
        json_list=True,
        closing="\n```",
    )
    # A JSON list of calls from its "[", else a single call from its "{", only when "name"
    # is the first key; the list pattern comes first (llama.cpp takes the first match).
    trigger_patterns = (r'(\[\s*\{\s*"name")', r'(\{\s*"name")')
    call_openers = ('{"name"', '[{"name"', "```tool_code")
    fallback_template = "gemma3.jinja"
    tool_template = "gemma3_tools.jinja"
    # Gemma3Processor (transformers) writes "\n\n<start_of_image>[image]<end_of_image>\n\n";
    # mtmd adds <start_of_image>/<end_of_image> itself, so only the newlines are ours.
    image_placeholder = ImagePlaceholder("<start_of_image>", "\n\n{marker}\n\n")

    def opener_markers(self, tool_names: Set[str]) -> tuple[str, ...]:
        """JSON and fence markers, plus ``[ <tool> (`` for each tool named like a Python
        identifier (bracketed Python-style calls)."""
        python = tuple(f"[ {name} (" for name in sorted(tool_names) if _IDENTIFIER.match(name))
        return (*_FENCE_MARKERS, *_JSON_MARKERS, *python)

    def parse_calls(self, text: str, tool_names: Set[str]) -> tuple[str, list[ToolCall]]:
        """Take Gemma calls out of ``text`` (see :meth:`Family.parse_calls`).

        A fenced call is removed with its fence lines; a list is taken whole or not at all.
        """
        markers = self.opener_markers(tool_names)
        kept: list[str] = []
        calls: list[ToolCall] = []
        pos = scan = 0
        while True:
            start, end, marker = find_marker(text, markers, scan)
            if marker is None or end == PARTIAL:
                break
            found = _calls_at(text, start, tool_names)
            if found is None:
                scan = start + 1
                continue
            span_end, new = found
            if not new:
                scan = span_end  # JSON that is no call: kept whole, not searched inside
                continue
            kept.append(text[pos:start])
            calls += new
            pos = scan = span_end
        kept.append(text[pos:])
        return "".join(kept), calls


def _calls_at(text: str, start: int, tool_names: Set[str]) -> tuple[int, list[ToolCall]] | None:
    """The calls that start at ``text[start]`` and where they end; no calls with an end
    for JSON there that is not a call; None when nothing decodes there."""
    if text.startswith("```", start):
        return _fenced_calls(text, start, tool_names)
    found = _json_calls_at(text, start, tool_names)
    if found is None and text[start] == "[":
        # Not JSON: maybe a bracketed list of Python-style calls.
        found = _python_list_at(text, start, tool_names)
    if found and found[1]:
        # A closing fence with no opening one (a grammar that ends calls with "\n```")
        # goes with the call, unless another fence follows that it could be opening.
        stray = _STRAY_FENCE.match(text, found[0])
        if stray and "```" not in text[stray.end() :]:
            found = (stray.end(), found[1])
    return found


def _fenced_calls(text: str, start: int, tool_names: Set[str]) -> tuple[int, list[ToolCall]] | None:
    fence = _FENCE.match(text, start)
    assert fence is not None  # the caller saw "```"
    lang = fence.group(1)
    close = text.find("```", fence.end())
    body_end, end = (close, close + 3) if close != -1 else (len(text), len(text))
    body = text[fence.end() : body_end]
    calls = _json_calls(body, tool_names)
    if calls is None and lang == "tool_code":
        calls = _python_calls(body, tool_names)
    return (end, calls) if calls else None


def _json_calls(source: str, tool_names: Set[str]) -> list[ToolCall] | None:
    try:
        obj = json.loads(source)
    except (ValueError, RecursionError):
        return None
    return _calls_from_json(obj, tool_names)


def _json_calls_at(
    text: str, start: int, tool_names: Set[str]
) -> tuple[int, list[ToolCall]] | None:
    try:
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return _cut_list_at(text, start, tool_names) if text[start] == "[" else None
    return end, _calls_from_json(obj, tool_names) or []


def _cut_list_at(text: str, start: int, tool_names: Set[str]) -> tuple[int, list[ToolCall]] | None:
    """The whole calls of a list that the end of output cut off (``max_tokens`` reached
    mid-list, e.g. ``[{call}, {call}, {"na``): the unfinished tail is dropped with it."""
    decoder = json.JSONDecoder()
    items: list[object] = []
    pos = start + 1
    while True:
        pos = _skip_space(text, pos)
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):
            break
        items.append(item)
        pos = _skip_space(text, pos)
        if not text.startswith(",", pos):
            return None  # the list goes on with something else: not a cut-off list
        pos += 1
    calls = _calls_from_json(items, tool_names) if items else None
    return (len(text), calls) if calls else None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _calls_from_json(obj: object, tool_names: Set[str]) -> list[ToolCall] | None:
    items = obj if isinstance(obj, list) else [obj]
    calls = [call_from_object(item, tool_names, GEMMA_ARGUMENT_KEYS) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def _python_list_at(
    text: str, start: int, tool_names: Set[str]
) -> tuple[int, list[ToolCall]] | None:
    """A bracketed list of Python-style calls at ``text[start]`` (``[f(a=1), g()]``)."""
    close = start
    for _ in range(_MAX_BRACKET_TRIES):
        close = text.find("]", close + 1)
        if close == -1:
            return None
        try:
            tree = ast.parse(text[start : close + 1], mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue  # that "]" was inside the list (a string or a nested list)
        calls = _known(_calls_from_nodes([tree.body]), tool_names)
        return (close + 1, calls) if calls else None
    return None


def _python_calls(source: str, tool_names: Set[str]) -> list[ToolCall] | None:
    """Python-style calls in a tool_code body: statements that are calls or call lists."""
    try:
        tree = ast.parse(source.strip(), mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not all(isinstance(stmt, ast.Expr) for stmt in tree.body):
        return None
    calls = _calls_from_nodes([stmt.value for stmt in tree.body if isinstance(stmt, ast.Expr)])
    return _known(calls, tool_names)


def _calls_from_nodes(nodes: list[ast.expr]) -> list[tuple[str, str]] | None:
    """(name, arguments JSON) per call node; a list node contributes its elements."""
    flat: list[ast.expr] = []
    for node in nodes:
        flat += node.elts if isinstance(node, ast.List) else [node]
    out: list[tuple[str, str]] = []
    for node in flat:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            return None
        values: dict[str, object] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None  # **kwargs
            try:
                values[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        arguments = arguments_json(values)
        if arguments is None:
            return None
        out.append((node.func.id, arguments))
    return out or None


def _known(calls: list[tuple[str, str]] | None, tool_names: Set[str]) -> list[ToolCall] | None:
    if not calls or any(name not in tool_names for name, _ in calls):
        return None
    return [ToolCall(id=new_call_id(), name=name, arguments=args) for name, args in calls]
