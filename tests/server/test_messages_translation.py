"""Anthropic Messages → chat request translation, stop-reason derivation and the error
body: pure logic, no model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ggufserve.api.messages_wire import CountTokensRequest, MessagesRequest, error_body
from ggufserve.api.wire import AssistantMessage, ToolMessage, UserMessage
from ggufserve.engine.base import Finished
from ggufserve.errors import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    PayloadTooLargeError,
    QueueFullError,
)
from ggufserve.generation.messages import stop_reason
from ggufserve.generation.messages_request import chat_request

PNG = "iVBORw0KGgo="
TOOL = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate_json(json.dumps({**body, **fields}))


def test_system_text_and_images_become_chat_messages() -> None:
    chat = chat_request(
        request(
            system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?", "cache_control": {}},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}},
                    ],
                }
            ],
            temperature=0.5,
            top_k=3,
            top_p=0.9,
            metadata={"user_id": "u1"},
        )
    )
    system, user = chat.messages
    assert system.role == "system" and system.content == "Be brief.\nBe kind."
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    urls = [part.image_url.url for part in user.content if part.type == "image_url"]
    assert urls == [f"data:image/png;base64,{PNG}", "https://x/a.png"]
    assert (chat.max_tokens, chat.temperature, chat.top_k, chat.top_p) == (8, 0.5, 3, 0.9)
    assert chat.logprobs is None  # no stop sequences: no logprobs asked for


def test_tool_turns_become_tool_calls_and_tool_messages() -> None:
    chat = chat_request(
        request(
            tools=[TOOL],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            messages=[
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Need a tool.", "signature": "s"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "t1",
                            "name": "get_weather",
                            "input": {"city": "Oslo"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "timeout"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": PNG,
                                    },
                                },
                            ],
                        },
                        {"type": "text", "text": "Try again?"},
                    ],
                },
                {"role": "user", "content": "Please."},
            ],
        )
    )
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools is not None and chat.tools[0].function.parameters == TOOL["input_schema"]
    _, assistant, tool, user = chat.messages
    assert isinstance(assistant, AssistantMessage) and assistant.tool_calls is not None
    assert assistant.content == "Checking." and assistant.reasoning_content == "Need a tool."
    call = assistant.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "t1",
        "get_weather",
        {"city": "Oslo"},
    )
    assert isinstance(tool, ToolMessage)
    assert (tool.tool_call_id, tool.name, tool.content) == ("t1", "get_weather", "Error: timeout")
    # The result's image moves to the user turn; the two user messages merged into one.
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    assert [part.type for part in user.content] == ["image_url", "text", "text"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    chat = chat_request(request(tools=[TOOL], tool_choice=choice))
    named = getattr(chat.tool_choice, "function", None)
    assert (named.name if named else chat.tool_choice) == expected
    assert chat.parallel_tool_calls is None


def test_thinking_effort_format_and_stops() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_request(
        request(
            thinking={"type": "disabled"},
            output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}},
            stop_sequences=["END"],
        )
    )
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert chat.reasoning_effort == "high"
    assert chat.response_format is not None and chat.response_format.json_schema is not None
    assert chat.response_format.json_schema.schema_ == schema
    assert chat.stop == ["END"] and chat.logprobs is None  # the engine names the stop
    enabled = chat_request(request(thinking={"type": "enabled", "budget_tokens": 2048}))
    assert enabled.chat_template_kwargs == {"enable_thinking": True}


def test_count_tokens_request_maps_without_max_tokens() -> None:
    body = CountTokensRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    )
    chat = chat_request(body)
    assert chat.max_tokens is None and chat.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0",
            "'document'",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages.0.content",
            "'file'",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0",
            "'web_search_20250305'",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "messages",
            "prefill",
        ),
        ({"container": "c1"}, "container", "Containers"),
        ({"mcp_servers": []}, "mcp_servers", "MCP"),
    ],
)
def test_refused_by_name(fields: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        chat_request(request(**fields))
    assert caught.value.param == param and words in caught.value.message


@pytest.mark.parametrize(
    ("finish", "stop_sequence", "expected"),
    [
        ("stop", None, ("end_turn", None)),
        ("stop", "END", ("stop_sequence", "END")),
        ("length", None, ("max_tokens", None)),
        ("tool_calls", None, ("tool_use", None)),
    ],
)
def test_stop_reason(
    finish: str, stop_sequence: str | None, expected: tuple[str, str | None]
) -> None:
    finished = Finished("length" if finish == "length" else "stop", 5, 3, 0, stop_sequence)
    assert stop_reason(finish, finished) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidRequestError("bad"), 400, "invalid_request_error"),
        (AuthenticationError("key"), 401, "authentication_error"),
        (ModelNotFoundError("x"), 404, "not_found_error"),
        (PayloadTooLargeError("big"), 413, "request_too_large"),
        (QueueFullError("busy", retry_after_s=1), 429, "rate_limit_error"),
        (ModelUnavailableError("loading"), 503, "overloaded_error"),
    ],
)
def test_error_body(error: APIError, status: int, kind: str) -> None:
    body = error_body(error, "r1")
    assert error.status_code == status
    assert body == {
        "type": "error",
        "error": {"type": kind, "message": error.message},
        "request_id": "r1",
    }
