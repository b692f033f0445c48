"""Model families as plug-ins: one :class:`Family` subclass per family owns everything the
server knows about that kind of model, and ``FAMILIES`` maps each llama.cpp
``general.architecture`` it serves to it.

A family owns (see :class:`Family`): its tool-call syntax (the grammar's layout of calls,
lazy-grammar trigger patterns, call openers whose single-token spelling is tokenized once at
load) and call parsing; its fallback chat template and tool-aware template (file names in
``chat_templates/``); the image placeholder its templates render; its reasoning tags; and the
GGUF architectures it serves. Nothing else in the server keys anything by family.

Adding a family is:

1. one file here, ``<family>.py``, with the ``Family`` subclass (set every class attribute,
   implement ``parse_calls``; override ``opener_markers`` if calls can start other than with
   ``call_openers``), and its class added to ``_CLASSES`` below;
2. its templates in ``chat_templates/`` (a fallback for GGUFs without one, and a tool-aware
   one if the model's own template cannot render tools);
3. its tests: call parsing and streaming equivalence (``tests/server/test_families.py``), the
   reply grammar accepting the calls it writes and parsing them back
   (``tests/server/test_family_plugins.py``), and its templates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from ggufserve.families.base import (
    ContentDelta,
    Family,
    ImagePlaceholder,
    ReasoningDelta,
    ReplyEvent,
    ReplyParser,
    ToolCall,
    parse_reply,
    reasoning_tags,
)
from ggufserve.families.gemma3 import Gemma3
from ggufserve.families.qwen3_vl import Qwen3VL
from ggufserve.families.reasoning import THINK, ReasoningTags, prompt_opens_reasoning

__all__ = [
    "FAMILIES",
    "THINK",
    "ContentDelta",
    "Family",
    "Gemma3",
    "ImagePlaceholder",
    "Qwen3VL",
    "ReasoningDelta",
    "ReasoningTags",
    "ReplyEvent",
    "ReplyParser",
    "ToolCall",
    "family_for",
    "parse_reply",
    "prompt_opens_reasoning",
    "reasoning_tags",
]

_CLASSES: tuple[type[Family], ...] = (Gemma3, Qwen3VL)

# llama.cpp `general.architecture` → the family serving it (the only key families have).
FAMILIES: Mapping[str, type[Family]] = MappingProxyType(
    {architecture: family for family in _CLASSES for architecture in family.architectures}
)


def family_for(
    architecture: str, tokenize: Callable[[str], list[int]] | None = None
) -> Family | None:
    """The Family for a llama.cpp architecture name (``gemma3``, ``qwen3vl``,
    ``qwen3vlmoe``), or None when no family serves it (no tool calls, no fallback template,
    no image placeholder). ``tokenize`` is the loaded model's tokenizer (see
    :class:`Family`)."""
    family = FAMILIES.get(architecture)
    return family(tokenize) if family is not None else None
