"""Per-family chat quirks: tool-call formats, reasoning split, tool-aware templates.

``family_for(architecture)`` maps a llama.cpp ``general.architecture`` to its Family.
"""

from __future__ import annotations

from ggufserve.families.base import (
    ContentDelta,
    Family,
    ReasoningDelta,
    ReplyEvent,
    ReplyParser,
    ToolCall,
    parse_reply,
)
from ggufserve.families.gemma3 import Gemma3
from ggufserve.families.qwen3_vl import Qwen3VL
from ggufserve.families.reasoning import THINK_CLOSE, THINK_OPEN, prompt_opens_reasoning

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "ContentDelta",
    "Family",
    "Gemma3",
    "Qwen3VL",
    "ReasoningDelta",
    "ReplyEvent",
    "ReplyParser",
    "ToolCall",
    "family_for",
    "parse_reply",
    "prompt_opens_reasoning",
]

_FAMILIES: dict[str, type[Family]] = {
    "gemma3": Gemma3,
    "qwen3vl": Qwen3VL,
    "qwen3vlmoe": Qwen3VL,
}


def family_for(architecture: str) -> Family | None:
    """The Family for a llama.cpp architecture name (``gemma3``, ``qwen3vl``,
    ``qwen3vlmoe``), or None when the architecture has no tool-call format here."""
    family = _FAMILIES.get(architecture)
    return family() if family is not None else None
