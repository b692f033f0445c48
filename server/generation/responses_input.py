"""A Responses request (+ the conversation it continues) → a chat completion request, so
that ``/v1/responses`` runs on the chat path (templates, tools, grammar, images, reasoning,
prefix cache); and its input items as stored and listed (ids assigned).

Fields and kinds the chat path cannot serve are refused by name here
(:func:`refuse_response_fields`, :func:`translate`); errors the chat path raises name chat
parameters, which :func:`responses_param` maps back to the Responses request's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from ggufserve.api.refusals import NEUTRAL_SERVICE_TIERS
from ggufserve.api.responses_wire import (
    HOSTED_TOOLS,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    NamespaceTool,
    OtherChoice,
    OtherItem,
    OtherPart,
    OtherTool,
    OutputTextPart,
    ReasoningItem,
    RefusalPart,
    ResponsesRequest,
)
from ggufserve.api.wire import ChatCompletionRequest, _GenerationFields
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.turns import merged_turns

ITEMS = TypeAdapter(list[InputItem])
# include values that ask for nothing this server leaves out: no encrypted reasoning is
# made (the reasoning is in plain ``content``), and input image URLs are kept as sent.
NEUTRAL_INCLUDES = frozenset({"reasoning.encrypted_content", "message.input_image.image_url"})
# Responses' reasoning efforts → the chat request's (a template variable).
EFFORTS = {
    "none": "minimal",
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
# Chat generation fields passed through as they are.
PASSED_FIELDS = set(_GenerationFields.model_fields) - {"n", "stream", "stream_options"}
DEFAULT_SCHEMA_NAME = "response"
# Item id prefixes, as OpenAI spells them.
ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


@dataclass(frozen=True)
class Translated:
    """The chat request a Responses request runs as, and for each of its messages the
    Responses parameter it came from (``instructions``, ``input.3``,
    ``previous_response_id``)."""

    chat: ChatCompletionRequest
    origins: list[str]


def refuse_response_fields(body: ResponsesRequest) -> None:
    """Raise for the first Responses field this server cannot honour.

    Raises:
        InvalidRequestError: with ``param`` naming the field.
    """
    refused: list[tuple[bool, str, str]] = [
        (body.n not in (None, 1), "n", "A response has one output; 'n' is not supported."),
        (
            body.truncation == "auto",
            "truncation",
            "Only truncation 'disabled' is supported: a conversation that does not fit the "
            "context is refused, never cut.",
        ),
        (bool(body.background), "background", "Background responses are not supported."),
        (
            body.conversation is not None,
            "conversation",
            "Conversations are not supported; chain responses with previous_response_id.",
        ),
        (body.prompt is not None, "prompt", "Stored prompt templates are not supported."),
        (body.max_tool_calls is not None, "max_tool_calls", "max_tool_calls is not supported."),
        (
            body.top_logprobs not in (None, 0),
            "top_logprobs",
            "Logprobs are not supported on /v1/responses; use /v1/chat/completions.",
        ),
        (
            body.service_tier not in NEUTRAL_SERVICE_TIERS,
            "service_tier",
            "Only the default service tier exists here.",
        ),
        (
            body.input is None and body.previous_response_id is None,
            "input",
            "input is required (unless previous_response_id continues a response).",
        ),
    ]
    for failed, param, why in refused:
        if failed:
            raise InvalidRequestError(why, param=param)
    for index, value in enumerate(body.include or []):
        if value not in NEUTRAL_INCLUDES:
            raise InvalidRequestError(
                f"include '{value[:64]}' is not supported.", param=f"include.{index}"
            )
    for index, tool in enumerate(body.tools or []):
        if isinstance(tool, OtherTool) and tool.type not in HOSTED_TOOLS:
            raise InvalidRequestError(
                f"Tools of type '{tool.type[:64]}' are not supported; only 'function' and "
                "'namespace' tools (hosted tools such as 'web_search' are ignored).",
                param=f"tools.{index}",
            )
        inner = tool.tools if isinstance(tool, NamespaceTool) else []
        for position, member in enumerate(inner):
            if isinstance(member, OtherTool):
                raise InvalidRequestError(
                    f"Tools of type '{member.type[:64]}' are not supported in a namespace; "
                    "only 'function' tools.",
                    param=f"tools.{index}.tools.{position}",
                )
    if isinstance(body.tool_choice, OtherChoice):
        raise InvalidRequestError(
            f"tool_choice of type '{body.tool_choice.type[:64]}' is not supported; send "
            "'auto', 'none', 'required' or {'type': 'function', 'name': ...}.",
            param="tool_choice",
        )


def request_items(body: ResponsesRequest) -> list[Any]:
    """The request's input as items (a string is one user message)."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    return list(body.input)


def stored_items(items: list[dict[str, Any]]) -> list[Any]:
    """Stored items (a conversation's history) as input items again."""
    return ITEMS.validate_python(items)


def item_records(items: list[Any], response_id: str) -> list[dict[str, Any]]:
    """Input items as stored and listed by ``input_items``: each with an ``id`` (its own,
    else ``<prefix>_<response id>_<index>``) and a status; message content as parts."""
    suffix = response_id.removeprefix("resp_")
    out = []
    for index, item in enumerate(items):
        record = item.model_dump(mode="json", by_alias=True, exclude_none=True)
        record.setdefault("id", f"{ID_PREFIXES.get(item.type, 'item')}_{suffix}_{index}")
        record.setdefault("status", "completed")
        if isinstance(item, MessageItem) and isinstance(item.content, str):
            kind = "output_text" if item.role == "assistant" else "input_text"
            part: dict[str, Any] = {"type": kind, "text": item.content}
            if kind == "output_text":
                part["annotations"] = []
            record["content"] = [part]
        out.append(record)
    return out


def translate(body: ResponsesRequest, history: list[Any]) -> Translated:
    """The chat request for ``body`` continuing ``history`` (the items of the response it
    chains onto; ``instructions`` are this request's only, as OpenAI does).

    Raises:
        InvalidRequestError: a refused item or content kind (named, with its path), a
            ``function_call_output`` without ``call_id``, or a field the chat request
            refuses (its path mapped back).
    """
    messages = _Messages()
    if body.instructions is not None:
        messages.add({"role": "system", "content": body.instructions}, "instructions")
    for item in history:
        messages.item(item, "previous_response_id")
    for index, item in enumerate(request_items(body)):
        messages.item(item, f"input.{index}")
    data: dict[str, Any] = body.model_dump(include=PASSED_FIELDS, exclude_none=True)
    turns, origins = merged_turns(messages.messages, messages.origins)
    data["messages"] = turns
    data.update(_tools(body))
    if body.text is not None and body.text.format is not None:
        data["response_format"] = _response_format(body)
    if body.reasoning is not None and body.reasoning.effort is not None:
        data["reasoning_effort"] = EFFORTS[body.reasoning.effort]
    if body.max_output_tokens is not None:
        data["max_completion_tokens"] = body.max_output_tokens
    try:
        chat = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        param = responses_param(param, origins)
        where = f"'{param}': " if param else ""
        raise InvalidRequestError(f"Invalid request: {where}{error['msg']}.", param=param) from None
    return Translated(chat, origins)


def _tools(body: ResponsesRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tools = [
        {"type": "function", "function": function}
        for tool in body.tools or []
        for function in _functions(tool)
    ]
    if tools:
        out["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        out["tool_choice"] = choice
    if body.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = body.parallel_tool_calls
    return out


def _functions(tool: Any) -> list[dict[str, Any]]:
    """A request tool as chat function definitions: a function tool as itself, a namespace
    tool's functions as ``<namespace>.<name>``, a hosted tool as none."""
    if isinstance(tool, FunctionTool):
        return [tool.model_dump(exclude={"type"}, exclude_none=True)]
    if isinstance(tool, NamespaceTool):
        return [
            {
                **member.model_dump(exclude={"type"}, exclude_none=True),
                "name": f"{tool.name}.{member.name}",
            }
            for member in tool.tools
            if isinstance(member, FunctionTool)
        ]
    return []


def _response_format(body: ResponsesRequest) -> dict[str, Any]:
    assert body.text is not None and body.text.format is not None
    fmt = body.text.format
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema: dict[str, Any] = {"name": fmt.name or DEFAULT_SCHEMA_NAME}
    for key, value in (
        ("schema", fmt.schema_),
        ("description", fmt.description),
        ("strict", fmt.strict),
    ):
        if value is not None:
            schema[key] = value
    return {"type": "json_schema", "json_schema": schema}


class _Messages:
    """Chat messages built item by item; consecutive assistant-side items (reasoning, a
    message, function calls: one earlier turn's output) merge into one assistant message
    (system and user messages merge afterwards: :func:`merged_turns`)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origins.append(origin)

    def _assistant(self, origin: str) -> dict[str, Any]:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            self.add({"role": "assistant"}, origin)
        return self.messages[-1]

    def item(self, item: Any, origin: str) -> None:
        if isinstance(item, MessageItem):
            self._message(item, origin)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {
                    "name": f"{item.namespace}.{item.name}" if item.namespace else item.name,
                    "arguments": item.arguments,
                },
            }
            self._assistant(origin).setdefault("tool_calls", []).append(call)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id is None:
                raise InvalidRequestError(
                    "A function_call_output needs the call_id of its function_call.",
                    param=f"{origin}.call_id",
                )
            output = item.output
            text = output if isinstance(output, str) else _text(output, origin, "output")
            self.add({"role": "tool", "tool_call_id": item.call_id, "content": text}, origin)
        elif isinstance(item, ReasoningItem):
            text = "".join(part.text for part in item.content or [])
            if text:
                message = self._assistant(origin)
                message["reasoning_content"] = message.get("reasoning_content", "") + text
        else:
            assert isinstance(item, OtherItem)
            raise InvalidRequestError(
                f"Input items of type '{item.type[:64]}' are not supported.", param=origin
            )

    def _message(self, item: MessageItem, origin: str) -> None:
        content = item.content
        if item.role == "assistant":
            text = content if isinstance(content, str) else _text(content, origin, "content")
            message = self._assistant(origin)
            message["content"] = (message.get("content") or "") + text
            return
        role = "system" if item.role == "developer" else item.role
        if isinstance(content, str):
            self.add({"role": role, "content": content}, origin)
            return
        if role == "system":
            self.add({"role": role, "content": _text(content, origin, "content")}, origin)
            return
        parts: list[dict[str, Any]] = []
        for index, part in enumerate(content):
            where = f"{origin}.content.{index}"
            if isinstance(part, InputImage):
                parts.append({"type": "image_url", "image_url": {"url": _image_url(part, where)}})
            else:
                parts.append({"type": "text", "text": _part_text(part, where)})
        self.add({"role": role, "content": parts}, origin)


def _image_url(part: InputImage, where: str) -> str:
    if part.file_id is not None:
        raise InvalidRequestError(
            "input_image file_id (the Files API) is not supported; send image_url (a URL, "
            "a data URL or a local path).",
            param=f"{where}.file_id",
        )
    if part.image_url is None:
        raise InvalidRequestError("input_image needs image_url.", param=f"{where}.image_url")
    return part.image_url


def _part_text(part: Any, where: str) -> str:
    if isinstance(part, (InputText, OutputTextPart)):
        return part.text
    if isinstance(part, RefusalPart):
        return part.refusal
    kind = part.type if isinstance(part, OtherPart) else "input_image"
    raise InvalidRequestError(f"Content of type '{kind[:64]}' is not supported here.", param=where)


def _text(parts: list[Any], origin: str, field: str) -> str:
    """Text-only content as one string (parts joined by newlines, as chat joins them)."""
    return "\n".join(
        _part_text(part, f"{origin}.{field}.{index}") for index, part in enumerate(parts)
    )


_CHAT_PARAMS = (
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^tools\.(\d+)\.function"), r"tools.\1"),
    (re.compile(r"^max_(completion_)?tokens"), "max_output_tokens"),
    (re.compile(r"^reasoning_effort"), "reasoning.effort"),
)


def responses_param(param: str | None, origins: list[str]) -> str | None:
    """A chat request's parameter path → the Responses request's (``messages.2.content.1``
    → ``input.1.content.1``; ``response_format.json_schema.schema`` → ``text.format.schema``)."""
    if param is None:
        return None
    found = re.match(r"^messages(?:\.(\d+))?", param)
    if found is not None:
        if found.group(1) is None or int(found.group(1)) >= len(origins):
            return "input" + param[found.end() :]
        return origins[int(found.group(1))] + param[found.end() :]
    for pattern, replacement in _CHAT_PARAMS:
        mapped, count = pattern.subn(replacement, param, count=1)
        if count:
            return mapped
    return param
