"""An Anthropic Messages request → the equivalent OpenAI chat request, so that
``/v1/messages`` runs on the chat path (templates, tools per family, grammar, reasoning
split, images, prefix cache).

The mapping: ``system`` (and ``system``-role messages) → system messages; consecutive
turns of one role are merged (Anthropic combines them); ``text`` / ``image`` blocks →
content parts (a base64 source → a data URL); ``tool_use`` → assistant ``tool_calls``;
``tool_result`` → ``tool`` messages (``is_error`` noted in the text; its images move to
the user turn after them); ``thinking`` → the assistant's ``reasoning_content``
(``redacted_thinking`` is dropped: nothing here can read it); ``tools`` → function tools;
``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` → ``auto`` / ``required`` / named /
``none``; ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``; ``thinking``
→ the template's ``enable_thinking``; ``output_config.effort`` → ``reasoning_effort``;
``output_config.format`` → a ``json_schema`` ``response_format``.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from pydantic import ValidationError

from ggufserve.api.messages_wire import (
    Base64Source,
    ContentBlockIn,
    CustomTool,
    ImageBlockIn,
    MessageIn,
    MessagesInput,
    MessagesRequest,
    OtherBlock,
    RedactedThinkingBlockIn,
    TextBlockIn,
    ThinkingBlockIn,
    ThinkingDisabled,
    ToolChoiceAny,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolResultBlockIn,
    ToolUseBlockIn,
    URLSource,
)
from ggufserve.api.wire import ChatCompletionRequest
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.turns import merged_turns

# output_config.effort → the chat request's reasoning_effort (it tops out at "high").
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
# The name the output format's schema gets on the chat path.
FORMAT_NAME = "output"
# Chat request fields → the Messages fields they came from (for errors' ``param``).
PARAMS = {
    "response_format": "output_config.format",
    "stop": "stop_sequences",
    "max_tokens": "max_tokens",
    "reasoning_effort": "output_config.effort",
    "chat_template_kwargs": "thinking",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}
REFUSED = {
    "container": "Containers (code execution) are not supported.",
    "mcp_servers": "Server-side MCP servers are not supported; declare the tools in 'tools'.",
}


def messages_param(param: str | None) -> str | None:
    """A chat request's parameter path as the Messages request names it."""
    if param is None:
        return None
    head, dot, rest = param.partition(".")
    return PARAMS.get(head, head) + dot + rest


def chat_request(body: MessagesInput) -> ChatCompletionRequest:
    """The chat request ``body`` means. A :class:`CountTokensRequest` maps as the same
    request with no ``max_tokens`` would (its prompt is the same).

    Raises:
        InvalidRequestError: a field, block, image source or tool refused by name, a
            final assistant message (prefill), or a value the chat request refuses.
    """
    for name, why in REFUSED.items():
        if getattr(body, name) is not None:
            raise InvalidRequestError(why, param=name)
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "keep_alive": body.keep_alive,
    }
    fields.update(_tools(body))
    fields.update(_reasoning(body))
    if body.output_config is not None and body.output_config.format is not None:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": FORMAT_NAME,
                "schema": body.output_config.format.schema_,
                "strict": True,
            },
        }
    if isinstance(body, MessagesRequest):
        fields.update(
            max_tokens=body.max_tokens,
            stop=body.stop_sequences,
            stream=body.stream,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
        )
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        param = messages_param(".".join(str(part) for part in error["loc"]) or None)
        raise InvalidRequestError(
            f"Invalid request: '{param}': {error['msg']}.", param=param
        ) from None


def _messages(body: MessagesInput) -> list[dict[str, Any]]:
    if body.messages[-1].role == "assistant":
        raise InvalidRequestError(
            "A final assistant message (prefill) is not supported; end with a user turn.",
            param="messages",
        )
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    names: dict[str, str] = {}  # tool_use id → tool name, for the tool messages
    turns = groupby(enumerate(body.messages), key=lambda item: item[1].role)
    for role, group in turns:
        items = list(group)
        where = f"messages.{items[0][0]}"
        blocks = [block for _, message in items for block in _blocks(message)]
        if role == "system":
            out.append({"role": "system", "content": _text(blocks, where)})
        elif role == "assistant":
            out.append(_assistant(blocks, names, where))
        else:
            out.extend(_user(blocks, names, where))
    return merged_turns(out, [""] * len(out))[0]


def _blocks(message: MessageIn) -> list[ContentBlockIn]:
    if isinstance(message.content, str):
        return [TextBlockIn(type="text", text=message.content)]
    return list(message.content)


def _refuse(block: Any, where: str) -> InvalidRequestError:
    kind = block.type if isinstance(block, OtherBlock) else type(block).__name__
    return InvalidRequestError(
        f"Content blocks of type '{kind}' are not supported here.", param=where
    )


def _text(blocks: str | list[Any], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    for block in blocks:
        if not isinstance(block, TextBlockIn):
            raise _refuse(block, where)
    return "\n".join(block.text for block in blocks)


def _image(block: ImageBlockIn, where: str) -> dict[str, Any]:
    source = block.source
    if isinstance(source, Base64Source):
        url = f"data:{source.media_type};base64,{source.data}"
    elif isinstance(source, URLSource):
        url = source.url
    else:
        raise InvalidRequestError(
            f"Image sources of type '{source.type}' are not supported; send 'base64' or 'url'.",
            param=f"{where}.content",
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _assistant(blocks: list[ContentBlockIn], names: dict[str, str], where: str) -> dict[str, Any]:
    texts, reasoning, calls = [], [], []
    for block in blocks:
        if isinstance(block, TextBlockIn):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlockIn):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlockIn):
            names[block.id] = block.name
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(
                {
                    "id": block.id,
                    "type": "function",
                    "function": {"name": block.name, "arguments": arguments},
                }
            )
        elif not isinstance(block, RedactedThinkingBlockIn):
            raise _refuse(block, where)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    return message


def _user(blocks: list[ContentBlockIn], names: dict[str, str], where: str) -> list[dict[str, Any]]:
    """A user turn: a ``tool`` message per ``tool_result`` (in order), then the user
    message with the rest (the results' images first)."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlockIn):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlockIn):
            parts.append(_image(block, where))
        elif isinstance(block, ToolResultBlockIn):
            text, images = _tool_result(block, where)
            tools.append(
                {
                    "role": "tool",
                    "tool_call_id": block.tool_use_id,
                    "content": text,
                    **({"name": names[block.tool_use_id]} if block.tool_use_id in names else {}),
                }
            )
            moved.extend(images)
        else:
            raise _refuse(block, where)
    parts = moved + parts
    if not parts and tools:
        return tools
    # One text block as a plain string: the prompt a plain chat request would give.
    plain = len(parts) == 1 and parts[0]["type"] == "text"
    return [*tools, {"role": "user", "content": parts[0]["text"] if plain else parts}]


def _tool_result(block: ToolResultBlockIn, where: str) -> tuple[str, list[dict[str, Any]]]:
    content = block.content
    images: list[dict[str, Any]] = []
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        texts = []
        for part in content:
            if isinstance(part, TextBlockIn):
                texts.append(part.text)
            elif isinstance(part, ImageBlockIn):
                images.append(_image(part, where))
            else:
                raise _refuse(part, where)
        text = "\n".join(texts)
    if block.is_error:
        text = f"Error: {text}"
    return text, images


def _tools(body: MessagesInput) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if body.tools is not None:
        tools = []
        for i, tool in enumerate(body.tools):
            if not isinstance(tool, CustomTool):
                raise InvalidRequestError(
                    f"Server tools ('{tool.type}') are not supported; define client tools "
                    "with 'input_schema'.",
                    param=f"tools.{i}",
                )
            function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
            if tool.description is not None:
                function["description"] = tool.description
            tools.append({"type": "function", "function": function})
        out["tools"] = tools
    choice = body.tool_choice
    if choice is None:
        return out
    if isinstance(choice, ToolChoiceNone):
        out["tool_choice"] = "none"
        return out
    if isinstance(choice, ToolChoiceTool):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = "required" if isinstance(choice, ToolChoiceAny) else "auto"
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _reasoning(body: MessagesInput) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if body.thinking is not None:
        out["chat_template_kwargs"] = {
            "enable_thinking": not isinstance(body.thinking, ThinkingDisabled)
        }
    if body.output_config is not None and body.output_config.effort is not None:
        out["reasoning_effort"] = EFFORTS[body.output_config.effort]
    return out
