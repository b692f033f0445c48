"""merged_turns: what agents send becomes turns Gemma 3's template accepts."""

from __future__ import annotations

import pytest

from ggufserve.generation.templates import ChatTemplateError
from ggufserve.generation.turns import merged_turns
from tests.conftest import gemma3_template


def roles(messages: list[dict[str, object]]) -> list[object]:
    return [m["role"] for m in messages]


def test_codex_shape_two_developer_then_two_user_messages() -> None:
    messages = [
        {"role": "system", "content": "Be precise."},
        {"role": "system", "content": "Skills."},
        {"role": "user", "content": "<environment_context/>"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    turns, origins = merged_turns(messages, ["input.0", "input.1", "input.2", "input.3"])
    assert roles(turns) == ["system", "user"] and origins == ["input.0", "input.2"]
    assert turns[0]["content"] == "Be precise.\n\nSkills."
    assert turns[1]["content"] == [
        {"type": "text", "text": "<environment_context/>"},
        {"type": "text", "text": "\n\n"},
        {"type": "text", "text": "hi"},
    ]
    assert messages[0]["content"] == "Be precise."  # the input is not changed


def test_claude_code_shape_a_system_message_after_the_first_user_turn() -> None:
    messages = [
        {"role": "system", "content": "You are an agent."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Agent types: ..."},
        {"role": "assistant", "content": "Hello."},
        {"role": "system", "content": "Reminder."},
        {"role": "user", "content": "go on"},
    ]
    turns, _ = merged_turns(messages, [""] * len(messages))
    assert roles(turns) == ["system", "user", "assistant", "user"]
    assert turns[1]["content"] == "hi\n\nAgent types: ..."
    assert turns[3]["content"] == "Reminder.\n\ngo on"
    # The earlier turns render exactly as before the later ones came (the KV cache holds).
    template = gemma3_template()
    head = template.render(turns[:2], add_generation_prompt=False)
    assert template.render(turns, add_generation_prompt=True).startswith(head)
    with pytest.raises(ChatTemplateError):
        template.render(messages, add_generation_prompt=True)


def test_assistant_and_tool_messages_are_left_alone() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"},
        {"role": "tool", "tool_call_id": "d", "content": "rain"},
    ]
    turns, origins = merged_turns(messages, ["a", "b", "c", "d"])
    assert turns == messages and origins == ["a", "b", "c", "d"]
