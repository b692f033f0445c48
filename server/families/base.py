"""What every model family shares: tool calls and reply events, the Family plug-in
interface (everything the server knows about one kind of model), and the incremental reply
parser that splits output into content, reasoning and tool calls.

Content and reasoning are reported stripped of surrounding whitespace: the parser holds
back leading whitespace until text follows and trailing whitespace until more text comes,
so streamed deltas concatenate to exactly what :func:`parse_reply` returns.
"""

from __future__ import annotations

import json
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from typing import Any, ClassVar

from ggufserve.families.reasoning import (
    THINK,
    Channel,
    ChannelSplitter,
    ReasoningTags,
    find_marker,
)
from ggufserve.grammar import CallSyntax


@dataclass(frozen=True)
class ToolCall:
    """One parsed call. ``arguments`` is the JSON text of the arguments object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


ReplyEvent = ContentDelta | ReasoningDelta


def new_call_id() -> str:
    """A fresh call id: ``call_`` + 24 random URL-safe characters."""
    return "call_" + secrets.token_urlsafe(18)


def arguments_json(value: Any) -> str | None:
    """JSON text of a call's arguments: an object, a JSON string holding one, or None
    (no arguments, ``{}``). Returns None for anything else."""
    if value is None:
        value = {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(value, dict):
        return None
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def call_from_object(obj: Any, tool_names: Set[str], keys: tuple[str, ...]) -> ToolCall | None:
    """A ToolCall from a decoded ``{"name": ..., <key>: {...}}`` object, or None when the
    name is not a known tool, the arguments (first present of ``keys``) are not an object,
    or other keys are present (besides ``id`` / ``type``): an echoed function definition,
    with its ``description``, is no call. A missing arguments key means no arguments."""
    if not isinstance(obj, dict) or not obj.keys() <= {"name", "id", "type", *keys}:
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in tool_names:
        return None
    raw = next((obj[key] for key in keys if key in obj), None)
    arguments = arguments_json(raw)
    if arguments is None:
        return None
    return ToolCall(id=new_call_id(), name=name, arguments=arguments)


@dataclass(frozen=True)
class ImagePlaceholder:
    """Where a family's chat template puts an image, and how mtmd's marker goes there.

    Attributes:
        text: What the template renders for one image part.
        replacement: What replaces ``text``, with ``{marker}`` standing for mtmd's marker.
    """

    text: str
    replacement: str

    def place(self, prompt: str, n_images: int, marker: str) -> str | None:
        """``prompt`` with each placeholder replaced around ``marker``; None when the
        prompt holds other than ``n_images`` placeholders."""
        if prompt.count(self.text) != n_images:
            return None
        return prompt.replace(self.text, self.replacement.format(marker=marker))


class Family(ABC):
    """A model family: how its tool calls are written (grammar) and parsed, its chat
    templates, image placeholder and reasoning tags, and the GGUF architectures it serves.

    Class attributes (a subclass sets each):
        name: Display name (``gemma3``, ``qwen3_vl``); nothing is keyed by it.
        architectures: llama.cpp ``general.architecture`` values served; the registry in
            ``ggufserve.families`` maps each to the family.
        call_syntax: How calls are laid out around their JSON (grammar of forced and
            triggered calls).
        trigger_patterns: llama.cpp lazy-grammar triggers (regex search over the output so
            far; the grammar starts at the first non-empty capture group), first match wins.
        call_openers: Literal texts that start a call, most typical first; the first one,
            when it is a single token of the model's vocabulary, also triggers the grammar.
        fallback_template: Shipped template (server/families/chat_templates/) for a GGUF
            without one; None = the GGUF must carry its own.
        tool_template: Shipped template to render requests that have tools or tool turns;
            None = the model's own template (it handles tools).
        image_placeholder: What the templates render for an image; None = no image input.
        reasoning: The tags around reasoning.

    An instance belongs to one loaded model: ``trigger_tokens`` is tokenized once, there.
    """

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    call_syntax: ClassVar[CallSyntax]
    trigger_patterns: ClassVar[tuple[str, ...]]
    call_openers: ClassVar[tuple[str, ...]]
    fallback_template: ClassVar[str | None]
    tool_template: ClassVar[str | None]
    image_placeholder: ClassVar[ImagePlaceholder | None]
    reasoning: ClassVar[ReasoningTags] = THINK

    def __init__(self, tokenize: Callable[[str], list[int]] | None = None):
        """The family for one model.

        Args:
            tokenize: The model's tokenizer (special tokens parsed, no BOS), called once
                here; None (no model, e.g. reply parsing) leaves ``trigger_tokens`` empty.
        """
        ids = tokenize(self.call_openers[0]) if tokenize is not None else []
        # The opener's token, if it is one, triggers the lazy grammar too.
        self.trigger_tokens: tuple[int, ...] = tuple(ids) if len(ids) == 1 else ()

    def opener_markers(self, tool_names: Set[str]) -> tuple[str, ...]:
        """Markers (a space = optional whitespace, see reasoning.py) after which output is
        held until the reply ends, because a call may have started. Default: call_openers."""
        return self.call_openers

    @abstractmethod
    def parse_calls(self, text: str, tool_names: Set[str]) -> tuple[str, list[ToolCall]]:
        """Take every recognised call out of ``text``.

        Returns:
            ``text`` with each call's span removed (surrounding prose kept as is), and the
            calls in order. Unknown tool names and malformed calls stay in the text; this
            never raises on model output.
        """


def reasoning_tags(family: Family | None) -> ReasoningTags:
    """The family's reasoning tags; ``<think>`` / ``</think>`` for a model without one."""
    return family.reasoning if family is not None else THINK


class _Trimmed:
    """Emits one channel's text stripped at both ends, without looking ahead; with
    ``trim`` False (a plain reply: no tools, no reasoning) the text passes as it is, so
    plain chat keeps OpenAI's exact text and streaming granularity."""

    def __init__(self, make: Callable[[str], ReplyEvent]):
        self._make = make
        self._space = ""
        self._started = False
        self.trim = True

    def push(self, text: str) -> list[ReplyEvent]:
        if not self.trim:
            return [self._make(text)] if text else []
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        if not self._started:
            body = body.lstrip()
        if not body:
            return []
        self._started = True
        return [self._make(body)]


class ReplyParser:
    """Incremental splitter of model output into content, reasoning and tool calls.

    Args:
        family: The model's Family; None parses no calls.
        tool_names: Names of callable tools; empty disables call parsing (all text is
            content or reasoning).
        reasoning_open: The rendered prompt ended inside an open ``<think>``, so output
            starts as reasoning.

    ``feed`` returns deltas that are certain; text that may be a partial ``<think>`` /
    ``</think>`` or call opener is held back, and once an opener is complete the rest of
    the output is held until ``finish``, where calls are parsed and leftovers emitted.
    No delta ever holds call text or a ``</think>`` tag.
    """

    def __init__(self, family: Family | None, tool_names: Iterable[str], reasoning_open: bool):
        self._family = family
        self._tools = frozenset(tool_names) if family is not None else frozenset()
        openers = family.opener_markers(self._tools) if family is not None and self._tools else ()
        self._splitter = ChannelSplitter(reasoning_open, openers, reasoning_tags(family))
        self._out = {"reasoning": _Trimmed(ReasoningDelta), "content": _Trimmed(ContentDelta)}

    def feed(self, text: str) -> list[ReplyEvent]:
        """Deltas for ``text`` (a chunk of output), possibly empty."""
        events: list[ReplyEvent] = []
        for channel, piece in self._splitter.feed(text):
            events += self._push(channel, piece)
        return events

    def _push(self, channel: Channel, text: str) -> list[ReplyEvent]:
        # Content is trimmed only where tools or reasoning were in play.
        self._out["content"].trim = bool(self._tools) or self._splitter.reasoned
        return self._out[channel].push(text)

    def finish(self, truncated: bool = False) -> tuple[list[ReplyEvent], list[ToolCall]]:
        """The last deltas and every tool call, at the end of output. Call once.

        ``truncated``: the output was cut (``max_tokens``); a call left unfinished there
        is dropped from the text rather than returned as content.
        """
        reasoning, content = self._splitter.finish()
        calls: list[ToolCall] = []
        if self._family is not None and self._tools:
            reasoning, found = self._family.parse_calls(reasoning, self._tools)
            calls += found
            content, found = self._family.parse_calls(content, self._tools)
            calls += found
            if truncated:
                markers = self._family.opener_markers(self._tools)
                reasoning = reasoning[: find_marker(reasoning, markers)[0]]
                content = content[: find_marker(content, markers)[0]]
        events = self._push("reasoning", reasoning) + self._push("content", content)
        return events, unique_calls(calls)


def unique_calls(calls: list[ToolCall]) -> list[ToolCall]:
    """``calls`` without repeats of an earlier call's name and arguments: one reply asking
    for the same call twice (small models loop) means it once."""
    seen: set[tuple[str, str]] = set()
    out = []
    for call in calls:
        key = (call.name, call.arguments)
        if key not in seen:
            seen.add(key)
            out.append(call)
    return out


def parse_reply(
    family: Family | None, text: str, tool_names: Iterable[str], reasoning_open: bool
) -> tuple[str | None, str | None, list[ToolCall]]:
    """Parse a whole reply (same rules as :class:`ReplyParser`).

    Returns:
        ``(content, reasoning, calls)``: content and reasoning stripped, None when empty.
    """
    parser = ReplyParser(family, tool_names, reasoning_open)
    events = parser.feed(text)
    more, calls = parser.finish()
    events += more
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    return content or None, reasoning or None, calls
