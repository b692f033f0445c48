"""Reasoning and tool calls on the tiny Qwen3-VL (random weights, real Qwen vocabulary):
a thinking template's output is split into ``reasoning_content`` and ``content``, and a
forced call is grammar-constrained even though the model itself emits noise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import QWEN_INSTRUCT, QWEN_THINKING, RunningServer

THINKING = QWEN_THINKING
INSTRUCT = QWEN_INSTRUCT
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 20},
                "limit": {"type": "integer"},
            },
            "required": ["query", "limit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def qwen(qwen_server: RunningServer) -> RunningServer:
    """The shared tiny Qwen3-VL server (tests/conftest.py): its ``qwen-instruct`` and
    ``qwen-thinking`` are the dense text GGUF with the built-in and the thinking template."""
    return qwen_server


@pytest.fixture(scope="module")
def sdk(qwen: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=qwen.v1, api_key="unused", max_retries=0) as client:
        yield client


ASK = [{"role": "user", "content": "Think, then answer: 2 + 2?"}]


def test_thinking_output_goes_to_reasoning_content(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model=THINKING,
        messages=ASK,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    message = response.choices[0].message.model_dump()
    # The random model never closes its <think>: everything it wrote is reasoning.
    assert message["reasoning_content"]
    assert not message["content"]
    assert "<think>" not in message["reasoning_content"]


def test_enable_thinking_false_reaches_the_template(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model=THINKING,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    message = response.choices[0].message.model_dump()
    assert message["content"] and message.get("reasoning_content") is None


def test_reasoning_streams_as_reasoning_deltas(qwen: RunningServer) -> None:
    body = {"model": THINKING, "messages": ASK, "max_tokens": 12, "temperature": 0, "stream": True}
    deltas: list[dict[str, Any]] = []
    with httpx.stream("POST", f"{qwen.v1}/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                deltas += [c["delta"] for c in json.loads(line[6:])["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert reasoning and not "".join(d.get("content") or "" for d in deltas)
    plain = httpx.post(
        f"{qwen.v1}/chat/completions", json={**body, "stream": False}, timeout=60
    ).json()
    assert reasoning == plain["choices"][0]["message"]["reasoning_content"]


def test_earlier_reasoning_is_accepted_in_history(sdk: openai.OpenAI) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4."},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    response = sdk.chat.completions.create(
        model=THINKING,
        messages=history,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert response.choices[0].finish_reason == "length"


@pytest.mark.parametrize("model", [INSTRUCT, THINKING])
def test_forced_call_from_a_random_model_is_valid(sdk: openai.OpenAI, model: str) -> None:
    """Random weights emit noise; the grammar alone makes the call valid. For the thinking
    template the call is forced after </think>, which noise never writes: with thinking
    off the grammar starts at once."""
    response = sdk.chat.completions.create(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        tools=[TOOL],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        temperature=0.7,
        seed=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls  # type: ignore[misc]
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"query", "limit"} and isinstance(arguments["limit"], int)
    assert len(arguments["query"]) <= 20
