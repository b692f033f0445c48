"""Responses requests → chat requests, item records and parameter paths (pure logic)."""

from __future__ import annotations

from typing import Any

import pytest

from ggufserve.api.responses_wire import ResponsesRequest
from ggufserve.api.wire import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.responses_input import (
    item_records,
    refuse_response_fields,
    request_items,
    responses_param,
    stored_items,
    translate,
)


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def test_string_input_and_instructions() -> None:
    translated = translate(request(instructions="Be brief."), [])
    system, user = translated.chat.messages
    assert isinstance(system, SystemMessage) and system.content == "Be brief."
    assert isinstance(user, UserMessage) and user.content == "hi"
    assert translated.origins == ["instructions", "input.0"]


def test_one_turns_output_items_merge_into_one_assistant_message() -> None:
    body = request(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
            {
                "type": "reasoning",
                "id": "rs_1",
                "summary": [],
                "content": [{"type": "reasoning_text", "text": "think"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Checking.", "annotations": []}],
            },
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[{"type": "function", "name": "w", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "w"},
        parallel_tool_calls=False,
    )
    chat = translate(body, []).chat
    user, assistant, tool = chat.messages
    assert isinstance(user, UserMessage)
    assert isinstance(assistant, AssistantMessage)
    assert assistant.reasoning_content == "think" and assistant.content == "Checking."
    assert assistant.tool_calls is not None and assistant.tool_calls[0].id == "call_1"
    assert isinstance(tool, ToolMessage) and tool.tool_call_id == "call_1"
    assert tool.content == "sunny"
    assert chat.tools is not None and chat.tools[0].function.name == "w"
    assert chat.tool_choice is not None and chat.tool_choice.function.name == "w"  # type: ignore[union-attr]
    assert chat.parallel_tool_calls is False


def test_history_comes_first_and_is_named_previous_response_id() -> None:
    history = stored_items(
        [
            {"type": "message", "role": "user", "content": "earlier"},
            {"type": "message", "role": "assistant", "content": "ok"},
        ]
    )
    translated = translate(request(), history)
    assert [m.content for m in translated.chat.messages] == ["earlier", "ok", "hi"]
    assert translated.origins == ["previous_response_id", "previous_response_id", "input.0"]


def test_consecutive_developer_and_user_messages_merge_into_alternating_turns() -> None:
    """Codex sends two developer messages, then two user messages (one with an image)."""
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Skills."}],
        },
        {"type": "message", "role": "user", "content": "<env/>"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "hi"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
            ],
        },
    ]
    chat = translate(request(input=items), []).chat
    system, user = chat.messages
    assert system.role == "system" and system.content == "Be brief.\n\nSkills."
    assert user.role == "user" and isinstance(user.content, list)
    kinds = [part.type for part in user.content]
    assert kinds == ["text", "text", "text", "image_url"]
    assert [getattr(part, "text", None) for part in user.content[:3]] == ["<env/>", "\n\n", "hi"]


def test_fields_map_to_chat() -> None:
    chat = translate(
        request(
            text={"format": {"type": "json_schema", "schema": {"type": "object"}, "strict": True}},
            reasoning={"effort": "xhigh"},
            max_output_tokens=7,
            temperature=0.5,
            top_k=3,
            keep_alive="5m",
        ),
        [],
    ).chat
    assert chat.response_format is not None and chat.response_format.json_schema is not None
    assert chat.response_format.json_schema.name == "response"  # the default name
    assert chat.reasoning_effort == "high"
    assert (chat.max_completion_tokens, chat.temperature, chat.top_k) == (7, 0.5, 3)
    assert chat.keep_alive == 300.0


def test_image_parts_keep_their_order() -> None:
    body = request(
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "a"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,AAAA",
                        "detail": "auto",
                    },
                ],
            }
        ]
    )
    [user] = translate(body, []).chat.messages
    assert [part.type for part in user.content] == ["text", "image_url"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"n": 2}, "n"),
        ({"include": ["file_search_call.results"]}, "include.0"),
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools.0"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"input": None}, "input"),
    ],
)
def test_refused_fields(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        refuse_response_fields(request(**fields))
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "item_reference", "id": "x"}, "input.0"),
        ({"type": "function_call_output", "output": "x"}, "input.0.call_id"),
        ({"role": "user", "content": [{"type": "input_audio"}]}, "input.0.content.0"),
        (
            {"role": "system", "content": [{"type": "input_image", "image_url": "a.png"}]},
            "input.0.content.0",
        ),
        ({"role": "user", "content": [{"type": "input_image"}]}, "input.0.content.0.image_url"),
    ],
)
def test_refused_items(item: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        translate(request(input=[item]), [])
    assert caught.value.param == param


def test_chat_validation_errors_name_responses_params() -> None:
    deep = "[" * 100 + "]" * 100
    with pytest.raises(InvalidRequestError) as caught:
        translate(request(input=[], instructions=None), [])
    assert caught.value.param == "input"
    with pytest.raises(Exception, match="nest more than"):
        request(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": deep}])


@pytest.mark.parametrize(
    ("chat", "responses"),
    [
        ("messages.1.content.2", "input.0.content.2"),
        ("messages", "input"),
        ("response_format.json_schema.schema", "text.format.schema"),
        ("response_format.schema", "text.format.schema"),
        ("tools.3.function.parameters", "tools.3.parameters"),
        ("max_tokens", "max_output_tokens"),
        ("reasoning_effort", "reasoning.effort"),
        ("tool_choice", "tool_choice"),
        (None, None),
    ],
)
def test_responses_param(chat: str | None, responses: str | None) -> None:
    assert responses_param(chat, ["instructions", "input.0"]) == responses


def test_item_records_get_ids_and_parts() -> None:
    body = request(
        input=[
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two", "id": "msg_mine"},
            {"type": "function_call_output", "call_id": "c", "output": "x"},
        ]
    )
    records = item_records(request_items(body), "resp_abc")
    assert [r["id"] for r in records] == ["msg_abc_0", "msg_mine", "fco_abc_2"]
    assert records[0]["content"] == [{"type": "input_text", "text": "one"}]
    assert records[1]["content"][0]["type"] == "output_text"
    assert all(r["status"] == "completed" for r in records)
    # Records read back as the same items (a chained request's history).
    assert [i.type for i in stored_items(records)] == ["message", "message", "function_call_output"]
