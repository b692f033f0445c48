"""Tool calling with the bundled Gemma 3 270M through the official SDK: calls are
grammar-constrained, so their arguments always parse and match the tool's schema."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]


def check_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every call names a known tool and its arguments are JSON matching its schema."""
    assert calls, "no tool call"
    out = []
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def forced(**overrides: Any) -> dict[str, Any]:
    """Request arguments: the weather question, one forced call, greedy (overridable)."""
    return {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 96,
        "temperature": 0,
        **overrides,
    }


def test_required_tool_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(**forced())
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [(name, _)] = check_calls(choice.message.tool_calls)
    assert name == "get_weather"


def test_required_tool_call_streamed_rebuilds_in_the_sdk(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(**forced()) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    check_calls(choice.message.tool_calls)


def test_stream_deltas_have_openai_shape(http: httpx.Client) -> None:
    body = forced(stream=True)
    calls: list[dict[str, Any]] = []
    content = ""
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            content += delta.get("content") or ""
            calls += delta.get("tool_calls") or []
    assert content == ""  # no call text leaks into content
    first, rest = calls[0], calls[1:]
    assert first["index"] == 0 and first["type"] == "function" and first["id"]
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert all("index" in c and "id" not in c for c in rest)
    json.loads("".join(c["function"].get("arguments", "") for c in calls))


def test_parallel_calls_with_two_tools(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        **forced(tools=[WEATHER, TIME], parallel_tool_calls=True, max_tokens=160)
    )
    calls = check_calls(response.choices[0].message.tool_calls)
    assert {name for name, _ in calls} <= {"get_weather", "get_time"}
    # The 270M model repeats its call until max_tokens: repeats are merged, and the
    # call cut off by max_tokens is dropped (finish_reason then says "length").
    assert len({(n, json.dumps(a)) for n, a in calls}) == len(calls)
    assert response.choices[0].finish_reason in ("tool_calls", "length")


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(**forced(tools=[WEATHER, TIME]))
    assert len(check_calls(response.choices[0].message.tool_calls)) == 1


def test_named_tool_choice_is_obeyed(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    response = client.chat.completions.create(**forced(tools=[WEATHER, TIME], tool_choice=named))
    [(name, arguments)] = check_calls(response.choices[0].message.tool_calls)
    assert name == "get_time" and isinstance(arguments["timezone"], str)


@pytest.mark.parametrize("seed", range(4))
def test_auto_calls_are_valid_whenever_made(client: openai.OpenAI, seed: int) -> None:
    """With ``auto`` the model may answer in prose; any call it opens is constrained."""
    response = client.chat.completions.create(
        **forced(tools=[WEATHER, TIME], tool_choice="auto", temperature=0.8, seed=seed)
    )
    choice = response.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls)
    else:
        assert choice.message.content is not None


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(**forced())
    message = first.choices[0].message
    call = message.tool_calls[0]  # type: ignore[index]
    history = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
    ]
    second = client.chat.completions.create(
        **forced(messages=history, tool_choice="auto", max_tokens=48)
    )
    choice = second.choices[0]
    if choice.message.tool_calls:
        check_calls(choice.message.tool_calls)
    else:
        assert choice.message.content
    # The call and its result were rendered into the prompt (and the rest came from cache).
    assert second.usage is not None and first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # type: ignore[union-attr]


def test_models_list_advertises_tools(client: openai.OpenAI) -> None:
    card = next(m for m in client.models.list().data if m.id == MODEL)
    assert "tools" in card.model_dump()["capabilities"]
