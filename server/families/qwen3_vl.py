"""Qwen3-VL (dense and MoE): Hermes-style tool calls.

A call is ``<tool_call>\\n{"name": "<fn>", "arguments": {...}}\\n</tool_call>``; several
calls are separated by ``\\n``. The model's own chat template renders tools (the Qwen3-VL
templates do), so no shipped tool template is needed.
"""

from __future__ import annotations

import json
from collections.abc import Set

from ggufserve.families.base import Family, ImagePlaceholder, ToolCall, call_from_object
from ggufserve.grammar import CallSyntax

QWEN_CALL_OPEN = "<tool_call>"
QWEN_CALL_CLOSE = "</tool_call>"
# The exact call layout the grammar builder emits: prefix + JSON object + suffix.
QWEN_CALL_PREFIX = QWEN_CALL_OPEN + "\n"
QWEN_CALL_SUFFIX = "\n" + QWEN_CALL_CLOSE
QWEN_ARGUMENTS_KEY = "arguments"


class Qwen3VL(Family):
    """Qwen3-VL's Hermes-style calls (see module doc)."""

    name = "qwen3_vl"
    architectures = ("qwen3vl", "qwen3vlmoe")
    call_syntax = CallSyntax(
        arguments_key=QWEN_ARGUMENTS_KEY,
        call_prefix=QWEN_CALL_PREFIX,
        call_suffix=QWEN_CALL_SUFFIX,
        separator="\n",
        json_list=False,
    )
    # The grammar starts at <tool_call> (a single token of Qwen's vocabulary: it triggers too).
    trigger_patterns = (r"(<tool_call>)",)
    call_openers = (QWEN_CALL_OPEN,)
    fallback_template = "qwen3vl.jinja"
    tool_template = None
    # Qwen3VLProcessor expands <|image_pad|> between <|vision_start|>/<|vision_end|>, which
    # mtmd also adds itself: the whole group becomes the marker.
    image_placeholder = ImagePlaceholder("<|vision_start|><|image_pad|><|vision_end|>", "{marker}")

    def parse_calls(self, text: str, tool_names: Set[str]) -> tuple[str, list[ToolCall]]:
        """Take ``<tool_call>`` blocks out of ``text`` (see :meth:`Family.parse_calls`).

        A block runs to its ``</tool_call>``, or, unterminated, to the next
        ``<tool_call>`` or the end; its JSON must decode to ``{"name", "arguments"}``
        with a known name (arguments an object or a JSON string holding one).
        """
        kept: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (start := text.find(QWEN_CALL_OPEN, pos)) != -1:
            body_start = start + len(QWEN_CALL_OPEN)
            close = text.find(QWEN_CALL_CLOSE, body_start)
            following = text.find(QWEN_CALL_OPEN, body_start)
            if close != -1 and (following == -1 or close < following):
                body_end, end = close, close + len(QWEN_CALL_CLOSE)
            else:
                body_end = end = following if following != -1 else len(text)
            call = _decode_call(text[body_start:body_end], tool_names)
            kept.append(text[pos:start] if call else text[pos:end])
            if call:
                calls.append(call)
            pos = end
        kept.append(text[pos:])
        return "".join(kept), calls


def _decode_call(body: str, tool_names: Set[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return call_from_object(obj, tool_names, (QWEN_ARGUMENTS_KEY,))
