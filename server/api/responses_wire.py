"""OpenAI Responses API wire models (``/v1/responses``), pydantic v2.

Request models follow ``openai.types.responses.response_create_params`` and are strict, as
the chat models are (:class:`ggufserve.api.wire.StrictModel`); the sampling fields and
extensions come from the chat request's shared base. Item, tool, tool-choice and content
kinds this server does not serve still validate (as ``Other*``) so that the refusal can
name them. Reply and event models follow ``openai.types.responses`` (``response.py``,
``response_stream_event.py``).

This module imports nothing of ours beyond :mod:`ggufserve.api.wire`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, Tag, field_validator

from ggufserve.api.wire import (
    MAX_TOOL_ARGUMENTS_DEPTH,
    StrictModel,
    _GenerationFields,
    json_nesting_exceeds,
    type_discriminator,
)

# OpenAI's limits on metadata: 16 pairs, keys of 64 and values of 512 characters.
MAX_METADATA_PAIRS = 16


# ---- request: content parts ------------------------------------------------------------


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class InputImage(StrictModel):
    """An image: ``image_url`` is a URL, a data URL or a path under the media root;
    ``file_id`` (the Files API) is refused by name."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class OutputTextPart(StrictModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None


class RefusalPart(StrictModel):
    type: Literal["refusal"]
    refusal: str


class OtherPart(StrictModel):
    """A content kind this server does not take (``input_file``, ``input_audio``, ...)."""

    type: str


ContentPart = Annotated[
    Annotated[InputText, Tag("input_text")]
    | Annotated[InputImage, Tag("input_image")]
    | Annotated[OutputTextPart, Tag("output_text")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[OtherPart, Tag("other")],
    type_discriminator(frozenset({"input_text", "input_image", "output_text", "refusal"})),
]


# ---- request: input items --------------------------------------------------------------


class MessageItem(StrictModel):
    """A message (``type`` may be left out, as the SDK's easy input message does)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


def _check_arguments(cls: type, value: str) -> str:
    # The arguments are parsed to render the history: bounded nesting, as chat bounds it.
    if json_nesting_exceeds(value, MAX_TOOL_ARGUMENTS_DEPTH):
        raise ValueError(
            f"arrays and objects nest more than {MAX_TOOL_ARGUMENTS_DEPTH} levels deep"
        )
    return value


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None
    id: str | None = None
    status: str | None = None

    _depth = field_validator("arguments")(_check_arguments)


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str | None = None
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class SummaryText(StrictModel):
    type: Literal["summary_text"]
    text: str


class ReasoningText(StrictModel):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(StrictModel):
    """Earlier reasoning: its ``content`` text goes back to the template as the assistant
    turn's reasoning; ``encrypted_content`` is never produced here and is ignored."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None


class OtherItem(StrictModel):
    """An item kind this server does not take (``item_reference``, hosted tool calls)."""

    type: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[OtherItem, Tag("other")],
    type_discriminator(
        frozenset({"message", "function_call", "function_call_output", "reasoning"}),
        default="message",
    ),
]


# ---- request: tools, formats, reasoning -----------------------------------------------


class FunctionTool(StrictModel):
    """A function tool in the Responses shape (flat: no ``function`` wrapper)."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class OtherTool(StrictModel):
    """A hosted or custom tool (``web_search``, ``file_search``, ``mcp``, ``custom``...):
    hosted ones are ignored, others refused (see ``HOSTED_TOOLS``)."""

    type: str


# Tools OpenAI's servers run themselves: nothing here can run them, so they are left out
# of the prompt (agents such as Codex send web_search with every request).
HOSTED_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "file_search",
        "code_interpreter",
        "image_generation",
        "computer_use_preview",
        "mcp",
        "tool_search",
    }
)

InnerTool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[OtherTool, Tag("other")],
    type_discriminator(frozenset({"function"})),
]


class NamespaceTool(StrictModel):
    """Function tools grouped under a name (``multi_agent_v1``); the model sees each as
    ``<namespace>.<name>`` and its calls come back with ``namespace`` set."""

    type: Literal["namespace"]
    name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_\-]+$")]
    description: str | None = None
    tools: Annotated[list[InnerTool], Field(max_length=128)]


Tool = Annotated[
    Annotated[FunctionTool, Tag("function")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[OtherTool, Tag("other")],
    type_discriminator(frozenset({"function", "namespace"})),
]


class FunctionChoice(StrictModel):
    type: Literal["function"]
    name: str


class OtherChoice(StrictModel):
    """A tool choice this server does not take (``allowed_tools``, hosted tool types)."""

    type: str


ToolChoice = Annotated[
    Annotated[FunctionChoice, Tag("function")] | Annotated[OtherChoice, Tag("other")],
    type_discriminator(frozenset({"function"})),
]


class TextFormat(StrictModel):
    """``text.format``: ``text``, ``json_object`` or ``json_schema`` (``name``, ``schema``,
    ``description``, ``strict``)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    # A hint for OpenAI's models; accepted and without effect here.
    verbosity: Literal["low", "medium", "high"] | None = None


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ReasoningConfig(StrictModel):
    effort: ReasoningEffort | None = None
    # Summaries are not generated: the reasoning itself is in the item's content.
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(_GenerationFields):
    """Body of ``POST /v1/responses``.

    ``store`` left out means true (OpenAI's default). The sampling fields and the
    extensions (``top_k``, ``min_p``, ``repeat_penalty``, ``seed``, ``stop``,
    ``keep_alive``) are chat's; ``n`` must stay 1.
    """

    input: str | Annotated[list[InputItem], Field(max_length=10_000)] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    store: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Any = None
    # Accepted only to be refused by name.
    background: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None


# ---- replies -------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class ReasoningTextOut(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = []
    content: list[ReasoningTextOut]
    status: ItemStatus


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus
    namespace: str | None = None

    @classmethod
    def named(cls, chat_name: str, namespaces: frozenset[str], **fields: Any) -> OutputFunctionCall:
        """The call of chat tool ``chat_name``: ``<namespace>.<name>`` for a tool of one of
        the request's ``namespaces`` comes back as ``name`` with ``namespace`` set."""
        space, dot, name = chat_name.partition(".")
        if dot and space in namespaces:
            return cls(name=name, namespace=space, **fields)
        return cls(name=chat_name, **fields)


OutputItem = OutputMessage | OutputReasoning | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    # Prompt tokens decoded (and so written to the KV cache) for this request.
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts: ``input_tokens`` (the prompt, ``cached_tokens`` of it from the prefix
    cache), ``output_tokens`` (``reasoning_tokens`` of them reasoning), ``total_tokens``."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseErrorWire(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str | None = None


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ReasoningEcho(BaseModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseObject(BaseModel):
    """A response (``object: "response"``), as returned, streamed and stored."""

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    completed_at: float | None = None
    background: bool = False
    error: ResponseErrorWire | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = {}
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningEcho = ReasoningEcho()
    service_tier: str = "default"
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = []
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


class InputItemList(BaseModel):
    """``GET /v1/responses/{id}/input_items``: one page of a response's input items."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---- stream events ---------------------------------------------------------------------


class LifecycleEvent(BaseModel):
    type: Literal[
        "response.created",
        "response.in_progress",
        "response.completed",
        "response.incomplete",
        "response.failed",
    ]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningTextOut


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ReasoningDeltaEvent(BaseModel):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDoneEvent(BaseModel):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: str | None


StreamEvent = (
    LifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ReasoningDeltaEvent
    | ReasoningDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)
