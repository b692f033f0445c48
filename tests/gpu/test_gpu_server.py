"""Our server with every layer on the device, through the official SDK: a chat, a streamed
chat, an image chat, a forced tool call, a ``json_schema`` reply and 8 concurrent streams.

The models have random weights, so "correct" is what the API promises whatever the
weights: lengths, finish reasons, usage, SSE framing, and grammar-constrained replies that
parse and match their schemas (enums keep them short). Whether batching changes greedy
text on the device (different kernels per batch size) is recorded, not asserted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import API_KEY, NO_EOG, RunningServer, start_server
from tests.e2e.test_vision import data_uri, png
from tests.gpu.models import SPEED, TINY_MM

pytestmark = pytest.mark.gpu
MAX_TOKENS = 16
STREAMS = 8
ASK = [{"role": "user", "content": "Write a short story about a lighthouse."}]
CHOICE = {"type": "string", "enum": ["lighthouse", "harbour", "storm"]}
PARAMETERS = {
    "type": "object",
    "properties": {"place": CHOICE, "stormy": {"type": "boolean"}},
    "required": ["place", "stormy"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "pick_place",
        "description": "Pick a place for the story.",
        "parameters": PARAMETERS,
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"setting": CHOICE, "happy_end": {"type": "boolean"}},
    "required": ["setting", "happy_end"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gpu_server(
    gpu_models: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory, logs: Path
) -> Iterator[RunningServer]:
    speed, mm = gpu_models[SPEED], gpu_models[TINY_MM]
    entries: list[dict[str, object]] = [
        {"id": SPEED, "gguf": {"path": speed["gguf"]}, "n_ctx": 4096, "n_parallel": STREAMS},
        {"id": TINY_MM, "gguf": {"path": mm["gguf"]}, "mmproj": {"path": mm["mmproj"]}},
    ]
    server = start_server(tmp_path_factory.mktemp("gpu-server"), entries)
    yield server
    server.stop()
    (logs / "gpu-server.log").write_text(server.log())


@pytest.fixture(scope="module")
def sdk(gpu_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gpu_server.v1, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def chat(sdk: openai.OpenAI, *, ban_eog: bool = True, **overrides: Any) -> Any:
    """Greedy; end-of-generation tokens banned unless a grammar must be able to finish."""
    request: dict[str, Any] = {
        "model": SPEED,
        "messages": ASK,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **({"logit_bias": NO_EOG} if ban_eog else {}),
        **overrides,
    }
    return sdk.chat.completions.create(**request)


def test_chat_and_stream(sdk: openai.OpenAI, figures: dict[str, Any]) -> None:
    reply = chat(sdk)
    chunks = list(chat(sdk, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    text = reply.choices[0].message.content
    figures.update(text=text, streamed=streamed, stream_equals_reply=streamed == text)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.choices[0].message.content
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert streamed


def test_image_chat(sdk: openai.OpenAI, figures: dict[str, Any]) -> None:
    image = {"type": "image_url", "image_url": {"url": data_uri(png(sigma=80))}}
    content = [image, {"type": "text", "text": "What is in the image?"}]
    with_image = chat(sdk, model=TINY_MM, messages=[{"role": "user", "content": content}])
    text_only = chat(sdk, model=TINY_MM, messages=[{"role": "user", "content": content[1:]}])
    grown = with_image.usage.prompt_tokens - text_only.usage.prompt_tokens
    figures.update(text=with_image.choices[0].message.content, prompt_tokens_added=grown)
    assert with_image.choices[0].finish_reason == "length"
    assert with_image.choices[0].message.content
    assert grown >= 16  # the tiny tower's 16 image tokens, plus its markers


def test_forced_tool_call(sdk: openai.OpenAI, figures: dict[str, Any]) -> None:
    named = {"type": "function", "function": {"name": "pick_place"}}
    reply = chat(sdk, tools=[TOOL], tool_choice=named, max_tokens=64, ban_eog=False)
    calls = reply.choices[0].message.tool_calls or []
    figures.update(calls=[c.function.model_dump() for c in calls])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["pick_place"]
    jsonschema.validate(json.loads(calls[0].function.arguments), PARAMETERS)


def test_json_schema_reply(sdk: openai.OpenAI, figures: dict[str, Any]) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "story", "schema": SCHEMA, "strict": True},
    }
    reply = chat(sdk, response_format=response_format, max_tokens=64, ban_eog=False)
    content = reply.choices[0].message.content or ""
    figures.update(content=content)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), SCHEMA)


def test_eight_concurrent_streams(gpu_server: RunningServer, figures: dict[str, Any]) -> None:
    prompts = [f"Write a story about the number {n}." for n in range(STREAMS)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=SPEED, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
            temperature=0, logit_bias=NO_EOG, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run(prompt_list: list[str]) -> list[tuple[str, str | None, int]]:
        async with openai.AsyncOpenAI(
            base_url=gpu_server.v1, api_key=API_KEY, max_retries=0, timeout=120
        ) as client:
            return list(await asyncio.gather(*(one(client, p) for p in prompt_list)))

    together = asyncio.run(run(prompts))
    solo = [asyncio.run(run([p]))[0] for p in prompts]
    figures.update(
        finishes=[f for _, f, _ in together],
        tokens=[t for _, _, t in together],
        equal_to_solo=sum(a[0] == b[0] for a, b in zip(together, solo, strict=True)),
    )
    assert [f for _, f, _ in together] == ["length"] * STREAMS
    assert [t for _, _, t in together] == [MAX_TOKENS] * STREAMS
    assert all(text for text, _, _ in together)
