"""What a chat request lets the model output: tools it may call (and how calls are
constrained) or a JSON schema its reply must follow, as a llama.cpp grammar.

Tool calls are grammar-constrained from the point the model opens one (a lazy grammar
triggered by the family's call opener) with ``tool_choice: auto``, and from the first
token with ``required`` or a named function (after ``</think>`` for a model that is
reasoning). ``response_format`` compiles its schema to GBNF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ggufserve.api.wire import ChatCompletionRequest, NamedToolChoice, ToolMessage
from ggufserve.engine.base import GrammarSpec
from ggufserve.errors import InvalidRequestError
from ggufserve.families.base import Family, reasoning_tags
from ggufserve.grammar import (
    JSON_OBJECT_GBNF,
    UnsupportedSchemaError,
    check_tools,
    json_schema_gbnf,
    tool_calls_gbnf,
)

# Calls in one reply when parallel calls are allowed (bounds a model that repeats its call).
MAX_PARALLEL_CALLS = 8


@dataclass(frozen=True)
class ToolSelection:
    """The tools of a request after ``tool_choice``.

    Attributes:
        shown: Tool dicts rendered into the prompt (None: no tools section).
        callable: Tool dicts the model may call now (a named choice leaves one).
        forced: The model must call (``required`` or a named function).
        parallel: Several calls allowed in one reply.
        uses_tool_turns: The history holds tool calls or results (render with the
            tool-aware template even if no tools are offered now).
    """

    shown: list[dict[str, Any]] | None
    callable: list[dict[str, Any]]
    forced: bool
    parallel: bool
    uses_tool_turns: bool

    @property
    def max_calls(self) -> int:
        return MAX_PARALLEL_CALLS if self.parallel else 1

    @property
    def names(self) -> set[str]:
        return {tool["function"]["name"] for tool in self.callable}


def select_tools(body: ChatCompletionRequest) -> ToolSelection:
    """Validate ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and pick the tools
    (no model needed: whether the model's family can call tools is the caller's check).

    Raises:
        InvalidRequestError: a forced choice without tools, a named function that is not
            in ``tools``, duplicate tool names, tools together with a JSON
            ``response_format``, or callable tools the grammar cannot enforce
            (:func:`ggufserve.grammar.check_tools`).
    """
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    uses_turns = any(
        isinstance(m, ToolMessage) or getattr(m, "tool_calls", None) for m in body.messages
    )
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("Tool names must be unique.", param="tools")
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and not tools:
        raise InvalidRequestError(
            "tool_choice requires a tool but 'tools' is empty.", param="tool_choice"
        )
    response_format = body.response_format
    if tools and choice != "none" and response_format and response_format.type != "text":
        raise InvalidRequestError(
            "response_format cannot be combined with tools; send tool_choice 'none' or "
            "drop one of them.",
            param="response_format",
        )
    callable_tools = tools if choice != "none" else []
    if isinstance(choice, NamedToolChoice):
        callable_tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not callable_tools:
            raise InvalidRequestError(
                f"tool_choice names '{choice.function.name}', which is not in 'tools'.",
                param="tool_choice",
            )
    if callable_tools:
        try:  # the call grammar needs the family; its checks do not
            check_tools(callable_tools)
        except UnsupportedSchemaError as exc:
            raise InvalidRequestError(str(exc), param="tools") from None
    return ToolSelection(
        shown=tools if tools and choice != "none" else None,
        callable=callable_tools,
        forced=forced,
        parallel=body.parallel_tool_calls is not False,
        uses_tool_turns=uses_turns,
    )


def reply_grammar(
    format_spec: GrammarSpec | None,
    selection: ToolSelection,
    family: Family | None,
    *,
    reasoning_open: bool,
) -> GrammarSpec | None:
    """The grammar for this reply, or None when output is free.

    Calls follow ``family.call_syntax``; with ``tool_choice: auto`` the grammar is lazy,
    triggered by ``family.trigger_patterns`` and ``family.trigger_tokens``.

    Args:
        format_spec: The ``response_format`` grammar (:func:`format_grammar`).
        reasoning_open: The prompt ends inside the family's reasoning tag: a forced call
            or a JSON reply may only start after the closing tag.

    Raises:
        InvalidRequestError: a tool schema the grammar cannot enforce (named).
    """
    think_end = reasoning_tags(family).close
    after_reasoning = (f"({re.escape(think_end)})",)
    if selection.callable and family is not None:
        syntax = family.call_syntax
        try:
            if selection.forced:
                lead = think_end if reasoning_open else ""
                gbnf = tool_calls_gbnf(
                    selection.callable, syntax, max_calls=selection.max_calls, lead=lead
                )
                if not lead:
                    return GrammarSpec(gbnf)
                return GrammarSpec(gbnf, trigger_patterns=after_reasoning)
            gbnf = tool_calls_gbnf(selection.callable, syntax, max_calls=selection.max_calls)
        except UnsupportedSchemaError as exc:
            raise InvalidRequestError(str(exc), param="tools") from None
        return GrammarSpec(
            gbnf, trigger_patterns=family.trigger_patterns, trigger_tokens=family.trigger_tokens
        )
    spec = format_spec
    if spec is None or not reasoning_open:
        return spec
    # A reasoning model thinks first: the JSON starts after </think> (lazy trigger).
    gbnf = re.sub(r"^root ::=", "json-reply ::=", spec.gbnf, count=1, flags=re.MULTILINE)
    gbnf = f'root ::= "{think_end}" [ \\t\\n]* json-reply\n{gbnf}'
    return GrammarSpec(gbnf, trigger_patterns=after_reasoning)


def format_grammar(body: ChatCompletionRequest) -> GrammarSpec | None:
    """The grammar ``response_format`` asks for (None: free text); needs no model.

    Raises:
        InvalidRequestError: a schema keyword the grammar cannot enforce (named), or a
            ``json_schema`` format without a schema.
    """
    response_format = body.response_format
    if response_format is None:
        return None
    if response_format.schema_ is not None and response_format.type != "json_object":
        raise InvalidRequestError(
            "response_format.schema goes with type 'json_object' (llama.cpp's extension); "
            "'json_schema' takes json_schema.schema.",
            param="response_format.schema",
        )
    if response_format.type == "text":
        return None
    if response_format.type == "json_object":
        if response_format.schema_ is None:
            return GrammarSpec(JSON_OBJECT_GBNF)
        return _schema_grammar(response_format.schema_, "response_format.schema")
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise InvalidRequestError(
            "response_format 'json_schema' needs json_schema.schema.",
            param="response_format.json_schema",
        )
    return _schema_grammar(spec.schema_, "response_format.json_schema.schema")


def _schema_grammar(schema: dict[str, Any], param: str) -> GrammarSpec:
    """The grammar of a JSON schema.

    Raises:
        InvalidRequestError: a keyword the grammar cannot enforce (named), at ``param``.
    """
    try:
        return GrammarSpec(json_schema_gbnf(schema))
    except UnsupportedSchemaError as exc:
        raise InvalidRequestError(str(exc), param=param) from None
