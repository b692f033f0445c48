"""OpenAI wire models for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``
(pydantic v2).

Fields follow the order and names of OpenAI's API reference. Request models are strict
(``"5"`` is not an integer, ``5.5`` is not an integer, ``NaN`` is not a number) and ignore
unknown fields, as OpenAI clients send fields this server has no use for. Extensions
beyond OpenAI (``top_k``, ``min_p``, ``repeat_penalty``) use llama.cpp's names.

This module imports nothing of ours.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 512
MAX_LOGIT_BIAS_ENTRIES = 1024
# llama_token is an int32: a token id has at most 10 ASCII digits (Unicode digits that
# str.isdigit() accepts, such as '²' or '①', are not token ids).
LOGIT_BIAS_KEY = re.compile(r"[0-9]{1,10}")
# top_k reaches llama.cpp as an int32.
MAX_TOP_K = 2**31 - 1
# Nesting levels of arrays/objects in an assistant tool call's `arguments` (a JSON text the
# server parses to render the history); deeper text would exhaust the parser's recursion.
MAX_TOOL_ARGUMENTS_DEPTH = 64
# A keep_alive duration string ("1h30m") is short; longer text is refused before parsing.
MAX_KEEP_ALIVE_CHARS = 64

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

# ---- keep_alive (Ollama's field) -----------------------------------------------------

# keep_alive of a model never unloaded for idleness (any negative value means it).
FOREVER = -1.0
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# ASCII digits only: \d would also take other scripts' digits, which Go durations do not.
_SECONDS = r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+"
_DURATION_PART = re.compile(rf"({_SECONDS})(ns|us|µs|ms|s|m|h)")
_KEEP_ALIVE_HELP = (
    "keep_alive must be seconds (a finite number), a duration such as '30s', '5m', '1h' or "
    f"'1h30m' (at most {MAX_KEEP_ALIVE_CHARS} characters), or -1 to keep the model loaded"
)


def keep_alive_seconds(value: Any) -> float:
    """Ollama's ``keep_alive`` → seconds (:data:`FOREVER` for any negative value).

    Accepts a number of seconds (int or float), a numeric string (seconds) or a Go-style
    duration string (``"30s"``, ``"5m"``, ``"1h30m"``, ``"500ms"``, ``"-1m"``); ``0``
    unloads the model as soon as it is idle.

    Raises:
        ValueError: anything else (booleans, NaN, infinities, integers beyond a float's
            range, strings over ``MAX_KEEP_ALIVE_CHARS`` characters, unknown units).
    """
    if isinstance(value, bool):
        raise ValueError(_KEEP_ALIVE_HELP)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond ~1.8e308
            raise ValueError(_KEEP_ALIVE_HELP) from None
    elif isinstance(value, str) and len(value) <= MAX_KEEP_ALIVE_CHARS:
        seconds = _duration(value.strip())
    else:
        raise ValueError(_KEEP_ALIVE_HELP)
    if not math.isfinite(seconds):
        raise ValueError(_KEEP_ALIVE_HELP)
    return FOREVER if seconds < 0 else seconds


def _duration(text: str) -> float:
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in "+-" else text
    if re.fullmatch(_SECONDS, body):
        return sign * float(body)
    if not body or _DURATION_PART.sub("", body):
        raise ValueError(_KEEP_ALIVE_HELP)
    total = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(body))
    return sign * total


def _optional_keep_alive(value: Any) -> float | None:
    return None if value is None else keep_alive_seconds(value)


# Seconds; FOREVER (-1) = never unloaded for idleness. Input: see keep_alive_seconds.
KeepAlive = Annotated[
    float | None,
    BeforeValidator(_optional_keep_alive),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number"},
                {"type": "string", "maxLength": MAX_KEEP_ALIVE_CHARS},
                {"type": "null"},
            ],
            "description": "Ollama's keep_alive: seconds, a duration ('30s', '5m', '1h30m') "
            "or -1 (never unload).",
        }
    ),
]


class StrictModel(BaseModel):
    """Base of every request model: strict types (``"5"`` is not an integer), unknown
    fields ignored, and the GIL handed over once per object while validating."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _interruptible(cls, data: Any) -> Any:
        # A Python call per object lets the interpreter hand the GIL to the event loop;
        # pydantic-core alone validates 15,000 messages in one 35 ms GIL hold.
        return data


def type_discriminator(
    known: frozenset[str], *, default: str | None = None, other: str = "other"
) -> Any:
    """A pydantic discriminator for a union tagged by ``type``: the value's ``type`` when
    it is one of ``known``, else ``other`` (``type`` absent: ``default``). Any JSON value
    may arrive (a number, a list, an unhashable ``type``): none of them raises."""

    def pick(value: Any) -> str:
        kind = (
            value.get("type", default) if isinstance(value, dict) else getattr(value, "type", None)
        )
        return kind if isinstance(kind, str) and kind in known else other

    return Discriminator(pick)


# One text, a list of texts, one list of token ids, or a list of them: a completion's
# ``prompt``, an embedding request's ``input``.
PromptInput = str | list[str] | list[int] | list[list[int]]


def input_items(value: PromptInput) -> list[str | list[int]]:
    """A ``prompt`` / ``input`` field as one item (a text or a token-id list) per prompt:
    ``"a"`` → ``["a"]``, ``[1, 2]`` → ``[[1, 2]]``, ``["a", "b"]`` and ``[[1], [2]]`` as
    they are (a new list; ``[]`` → ``[]``)."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [cast(list[int], value)]
    return list(cast(list[str] | list[list[int]], value))


# ---- request: messages --------------------------------------------------------------


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ImageURL(StrictModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(StrictModel):
    type: Literal["image_url"]
    image_url: ImageURL


UserContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(StrictModel):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(StrictModel):
    role: Literal["user"]
    content: str | list[UserContentPart]
    name: str | None = None


# Bytes of text scanned per step by json_nesting_exceeds (bounds its temporary arrays).
_DEPTH_CHUNK_BYTES = 1 << 20


def json_nesting_exceeds(text: str, max_depth: int) -> bool:
    """Whether a recursive JSON parser reading ``text`` (valid JSON or not) would nest
    arrays/objects more than ``max_depth`` levels deep.

    Linear time, bounded memory (numpy over 1 MiB chunks, stopping at the first level past
    ``max_depth``): brackets inside strings do not count, an unterminated string runs to
    the end. For invalid text it may count levels a parser would fail before, never fewer.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return False
    # Drop escaped backslashes, then escaped quotes: every '"' left opens or closes a string.
    data = text.replace("\\\\", "").replace('\\"', "").encode()
    quotes = level = 0
    for start in range(0, len(data), _DEPTH_CHUNK_BYTES):
        chunk = np.frombuffer(data, np.uint8, min(_DEPTH_CHUNK_BYTES, len(data) - start), start)
        outside = ((np.cumsum(chunk == ord('"'), dtype=np.int64) + quotes) & 1) == 0
        quotes = int(not outside[-1])
        opens = ((chunk == ord("[")) | (chunk == ord("{"))) & outside
        closes = ((chunk == ord("]")) | (chunk == ord("}"))) & outside
        levels = np.cumsum(opens.astype(np.int64) - closes) + level
        if int(levels.max()) > max_depth:
            return True
        level = int(levels[-1])
    return False


class FunctionCall(StrictModel):
    name: str
    arguments: Annotated[
        str,
        Field(
            description="JSON text; arrays and objects nest at most "
            f"{MAX_TOOL_ARGUMENTS_DEPTH} levels."
        ),
    ]

    @field_validator("arguments")
    @classmethod
    def _check_depth(cls, value: str) -> str:
        # The history's arguments are parsed (json.loads recurses): refuse what would
        # exhaust the recursion limit, in linear time, before anything parses it.
        if json_nesting_exceeds(value, MAX_TOOL_ARGUMENTS_DEPTH):
            raise ValueError(
                f"arrays and objects nest more than {MAX_TOOL_ARGUMENTS_DEPTH} levels deep"
            )
        return value


class ToolCallMessage(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(StrictModel):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallMessage] | None = None
    # Not OpenAI's: earlier reasoning, as DeepSeek/vLLM/llama.cpp clients send it back.
    reasoning_content: str | None = None


class ToolMessage(StrictModel):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str
    name: str | None = None


ChatMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


# The name a ``json_schema`` format gets when it has none (llama.cpp and vLLM accept that).
DEFAULT_SCHEMA_NAME = "response"


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=64)] = DEFAULT_SCHEMA_NAME
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(StrictModel):
    """OpenAI's ``response_format``; ``schema`` is llama.cpp's extension of ``json_object``
    (a JSON object that follows the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None


class StreamOptions(StrictModel):
    include_usage: bool = False


# ---- request ---------------------------------------------------------------------------


def check_stop(cls: type, value: str | list[str] | None) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
    for stop in stops:
        if not stop:
            raise ValueError("stop sequences must not be empty")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise ValueError(
                f"each stop sequence must be at most {MAX_STOP_SEQUENCE_CHARS} characters"
            )
    return stops


def check_logit_bias(cls: type, value: dict[str, float] | None) -> dict[str, float] | None:
    if value is None:
        return None
    for key in value:  # the entry count is bounded by the field's max_length first
        if not LOGIT_BIAS_KEY.fullmatch(key):
            raise ValueError(
                "logit_bias keys must be token ids: non-negative integers written with 1 to "
                "10 ASCII digits"
            )
    return value


class _GenerationFields(StrictModel):
    """Fields chat and text completions share: model, sampling, stops, streaming.

    Sampling fields left as ``None`` take the model's defaults from ``models.yaml``.
    """

    model: str
    frequency_penalty: Annotated[FiniteFloat, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: (
        Annotated[
            dict[str, Annotated[FiniteFloat, Field(ge=-100.0, le=100.0)]],
            Field(
                max_length=MAX_LOGIT_BIAS_ENTRIES,
                json_schema_extra={"propertyNames": {"pattern": f"^{LOGIT_BIAS_KEY.pattern}$"}},
            ),
        ]
        | None
    ) = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    presence_penalty: Annotated[FiniteFloat, Field(ge=-2.0, le=2.0)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[FiniteFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    user: str | None = None
    # llama.cpp extensions
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = None
    min_p: Annotated[FiniteFloat, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[FiniteFloat, Field(gt=0.0, le=10.0)] | None = None
    # Ollama extension: how long the model stays loaded once idle (this request's value
    # replaces the model's until the next request).
    keep_alive: KeepAlive = None
    # Extension: false turns the model's speculative decoding off for this request.
    speculative: bool | None = None

    _check_stop = field_validator("stop")(check_stop)
    _check_logit_bias = field_validator("logit_bias")(check_logit_bias)


class ChatCompletionRequest(_GenerationFields):
    """Body of ``POST /v1/chat/completions``.

    ``max_completion_tokens`` wins over the legacy ``max_tokens`` when both are set.
    """

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # vLLM / llama.cpp extension
    chat_template_kwargs: dict[str, Any] | None = None
    # ggufserve extension: tokens per image for Qwen-VL models, within the model's range
    # (docs/api.md#image-token-budget); a 400 for fixed-size projectors (Gemma 3).
    image_min_tokens: Annotated[int, Field(ge=1)] | None = None
    image_max_tokens: Annotated[int, Field(ge=1)] | None = None
    # Accepted only to be refused by name (see server/api/refusals.py).
    chat_template: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    service_tier: Any = None


# ---- responses -------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReasonWire = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobWire(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobWire] | None
    refusal: list[TokenLogprobWire] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_empty_extras(self, handler: Any) -> dict[str, Any]:
        # Plain replies look exactly like OpenAI's: no tool_calls/reasoning keys when empty.
        data: dict[str, Any] = handler(self)
        for key in ("tool_calls", "reasoning_content"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonWire


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: CompletionUsage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only the fields that changed: {"content": "..."}, then {}.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonWire | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


# ---- /v1/completions -------------------------------------------------------------------


class CompletionRequest(_GenerationFields):
    """Body of ``POST /v1/completions`` (OpenAI's legacy text completions).

    ``prompt`` is one text, a list of texts, token ids, or a list of token-id lists (``n``
    choices per prompt). Token-id prompts are used as given (no BOS added).
    ``max_tokens`` may be 0 with ``echo`` to score a prompt (lm-evaluation-harness).
    """

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=64),
        ]
    )
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    # Accepted only to be refused by name.
    suffix: Any = None
    best_of: Any = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token (prompt tokens first
    with ``echo``; the prompt's first token has a null logprob)."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    """One model of ``/v1/models``. Fields after ``owned_by`` are not OpenAI's (its
    clients ignore them): ``capabilities`` as Ollama names them, then the model's load
    state (what ``ggufserve ps`` shows).

    Attributes:
        state: ``available`` (not loaded), ``loading``, ``ready`` (loaded) or ``failed``.
        memory_bytes: Estimated memory of the model once loaded (GGUF + mmproj + KV
            cache), known once the model has been looked at for loading; else None.
        expires_at: Unix time (s) the model unloads if it stays idle (loaded with a
            finite keep_alive and no request in flight); else None.
        idle_s: Seconds since its last request ended (loaded and idle); else None.
        in_flight: Requests using the model or waiting for it to load.
        keep_alive_s: Idle seconds before unloading; -1 = never.
        load_progress: Fraction (0..1) of the weights llama.cpp has loaded, while
            ``loading``; else None.
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ggufserve"
    capabilities: list[Literal["completion", "vision", "tools", "embedding"]] = ["completion"]
    state: Literal["available", "loading", "ready", "failed"] = "available"
    memory_bytes: int | None = None
    expires_at: float | None = None
    idle_s: float | None = None
    in_flight: int = 0
    load_progress: float | None = None
    keep_alive_s: float = FOREVER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
