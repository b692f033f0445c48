"""llama.cpp GBNF grammars for OpenAI structured outputs and tool calls.

JSON schemas are converted by llama-cpp-python's ``SchemaConverter`` (a port of llama.cpp's
``json_schema_to_grammar.py``) after :mod:`ggufserve.grammar.schema` has refused every keyword
the converter would silently ignore and rewritten the rest into shapes it converts exactly.
"""

from __future__ import annotations

from ggufserve.grammar.gbnf import (
    JSON_OBJECT_GBNF,
    CallSyntax,
    check_tools,
    json_schema_gbnf,
    tool_calls_gbnf,
)
from ggufserve.grammar.keywords import UnsupportedSchemaError
from ggufserve.grammar.schema import check_schema

__all__ = [
    "JSON_OBJECT_GBNF",
    "CallSyntax",
    "UnsupportedSchemaError",
    "check_schema",
    "check_tools",
    "json_schema_gbnf",
    "tool_calls_gbnf",
]
