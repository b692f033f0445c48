"""Anthropic Messages wire models for ``/v1/messages`` and ``/v1/messages/count_tokens``
(pydantic v2), after the ``anthropic`` SDK's request and reply types, and Anthropic's
error body.

Requests are strict (``"5"`` is not an integer) and ignore unknown top-level and block
fields, as Anthropic adds fields often and clients send them (``cache_control``,
``citations``, ``context_management``…). Content blocks, image sources and tools of a
type this server cannot serve parse as :class:`OtherBlock` / :class:`ServerTool` so
that the translation refuses them by name (see :mod:`ggufserve.generation.messages_request`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Tag, field_validator

from ggufserve.api.wire import (
    MAX_TOP_K,
    FiniteFloat,
    KeepAlive,
    StrictModel,
    check_stop,
    type_discriminator,
)
from ggufserve.errors import APIError

# ---- request: content blocks -----------------------------------------------------------


class TextBlockIn(StrictModel):
    type: Literal["text"]
    text: str


class Base64Source(StrictModel):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(StrictModel):
    type: Literal["url"]
    url: str


class OtherSource(StrictModel):
    """An image source this server cannot read (``file``: the Files API)."""

    type: str


ImageSource = Annotated[
    Annotated[Base64Source, Tag("base64")]
    | Annotated[URLSource, Tag("url")]
    | Annotated[OtherSource, Tag("other")],
    type_discriminator(frozenset({"base64", "url"})),
]


class ImageBlockIn(StrictModel):
    type: Literal["image"]
    source: ImageSource


class OtherBlock(StrictModel):
    """A content block of a type this server does not serve (``document``,
    ``search_result``, server-tool blocks…): refused by name."""

    type: str


ToolResultPart = Annotated[
    Annotated[TextBlockIn, Tag("text")]
    | Annotated[ImageBlockIn, Tag("image")]
    | Annotated[OtherBlock, Tag("other")],
    type_discriminator(frozenset({"text", "image"})),
]


class ToolUseBlockIn(StrictModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlockIn(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultPart] | None = None
    is_error: bool | None = None


class ThinkingBlockIn(StrictModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlockIn(StrictModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlockIn = Annotated[
    Annotated[TextBlockIn, Tag("text")]
    | Annotated[ImageBlockIn, Tag("image")]
    | Annotated[ToolUseBlockIn, Tag("tool_use")]
    | Annotated[ToolResultBlockIn, Tag("tool_result")]
    | Annotated[ThinkingBlockIn, Tag("thinking")]
    | Annotated[RedactedThinkingBlockIn, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    type_discriminator(
        frozenset({"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"})
    ),
]


class MessageIn(StrictModel):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockIn]


# ---- request: tools, thinking, output ----------------------------------------------------


class CustomTool(StrictModel):
    type: Literal["custom"] | None = None
    # The chat path's tool-name rule (Anthropic's is the same without '.').
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None


class ServerTool(StrictModel):
    """A tool Anthropic runs server-side (``web_search_…``, ``bash_…``…): refused by name."""

    type: str
    name: str | None = None


Tool = Annotated[
    Annotated[CustomTool, Tag("custom")] | Annotated[ServerTool, Tag("server")],
    type_discriminator(frozenset({"custom"}), default="custom", other="server"),
]


class ToolChoiceAuto(StrictModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(StrictModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(StrictModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(StrictModel):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
    Field(discriminator="type"),
]


class ThinkingEnabled(StrictModel):
    type: Literal["enabled"]
    # Accepted, not enforced: reasoning ends when the model closes it, within max_tokens.
    budget_tokens: Annotated[int, Field(ge=1)]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(StrictModel):
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(StrictModel):
    type: Literal["disabled"]


Thinking = Annotated[
    ThinkingEnabled | ThinkingAdaptive | ThinkingDisabled, Field(discriminator="type")
]


class JSONOutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: Annotated[dict[str, Any], Field(alias="schema")]


class OutputConfig(StrictModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JSONOutputFormat | None = None


class Metadata(StrictModel):
    user_id: str | None = None


# ---- requests ----------------------------------------------------------------------------


class MessagesInput(StrictModel):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the model, the
    conversation and what shapes its prompt."""

    model: str
    messages: Annotated[list[MessageIn], Field(min_length=1)]
    system: str | list[TextBlockIn] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # Ollama extension: how long the model stays loaded once idle (see wire.py).
    keep_alive: KeepAlive = None
    # Accepted only to be refused by name (server-side features this server lacks).
    container: Any = None
    mcp_servers: Any = None


class MessagesRequest(MessagesInput):
    """Body of ``POST /v1/messages``. ``max_tokens`` is required, as Anthropic requires it."""

    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _check_stops(cls, value: list[str] | None) -> list[str] | None:
        return check_stop(cls, value)


class CountTokensRequest(MessagesInput):
    """Body of ``POST /v1/messages/count_tokens``."""


# ---- replies -----------------------------------------------------------------------------


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingContent(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    # Anthropic's opaque signature: empty, as nothing here verifies returned thinking.
    signature: str = ""


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlockOut = TextContent | ThinkingContent | ToolUseContent
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Usage(BaseModel):
    """Token counts: ``input_tokens`` are the prompt tokens decoded for this request,
    ``cache_read_input_tokens`` those reused from the KV cache (their sum is the prompt)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlockOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# ---- stream events -----------------------------------------------------------------------


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlockOut


class TextDeltaOut(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ThinkingDeltaOut(BaseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDeltaOut | InputJSONDelta | ThinkingDeltaOut


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(BaseModel):
    stop_reason: StopReason
    stop_sequence: str | None = None


class MessageDeltaEvent(BaseModel):
    """The reply's end: its stop reason and its usage (cumulative totals, the input's
    final split between decoded and cached tokens included)."""

    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: Usage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


# ---- errors ------------------------------------------------------------------------------

MESSAGES_PATH = "/v1/messages"
# Anthropic's error type for each HTTP status this server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_messages_path(path: str) -> bool:
    """Whether a request path is Anthropic's (its errors take Anthropic's shape)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_body(error: APIError, request_id: str | None = None) -> dict[str, Any]:
    """Anthropic's error body ``{"type": "error", "error": {"type", "message"},
    "request_id"}``; the type follows the status (other 4xx: ``invalid_request_error``,
    other 5xx: ``api_error``), a 503 (loading, draining, KV cache full) is
    ``overloaded_error``."""
    status = error.status_code
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body
