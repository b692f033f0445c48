"""OpenAI's Responses API (``/v1/responses``) on the real server through the official SDK:
plain, streamed (events checked against the SDK's published types), tools round trip,
structured output, ``responses.parse``, chained turns served from the prefix cache, the
store's endpoints, images and reasoning on the tiny models, refusals by name, and a
stream cut short that leaves the server serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from tests.conftest import NO_EOG, QWEN_THINKING, TINY_VISION, RunningServer
from tests.e2e.conftest import MODEL
from tests.e2e.test_vision import data_uri, png

EVENTS = TypeAdapter(ResponseStreamEvent)
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["name", "population"],
    "additionalProperties": False,
}


def greedy(**overrides: Any) -> dict[str, Any]:
    """A short greedy request (overridable); stops at the first full stop."""
    return {
        "model": MODEL,
        "input": "Say hello to Ada.",
        "max_output_tokens": 24,
        "temperature": 0,
        "extra_body": {"stop": ["."]},
        **overrides,
    }


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each server-sent event of a streamed reply."""
    name: str | None = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
            name = None


def test_create_returns_a_response(client: openai.OpenAI) -> None:
    response = client.responses.create(**greedy(metadata={"ticket": "42"}))
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == MODEL
    assert response.metadata == {"ticket": "42"}
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.output_text and response.output_text == message.content[0].text
    usage = response.usage
    assert usage is not None and usage.input_tokens > 5 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        **greedy(max_output_tokens=5, extra_body={"logit_bias": NO_EOG})
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5
    assert response.output[-1].status == "incomplete"


def test_stream_events_rebuild_the_response(client: openai.OpenAI) -> None:
    with client.responses.stream(**greedy()) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and deltas
    assert final.output_text == "".join(deltas) and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens >= len(deltas)
    # Stored as streamed.
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_raw_stream_matches_published_event_types(http: httpx.Client) -> None:
    body = {**greedy(stream=True), **greedy()["extra_body"]}
    del body["extra_body"]
    with http.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = list(sse_events(response))
    for name, data in frames:
        assert name == data["type"]  # every frame is typed; no [DONE]
        EVENTS.validate_python(data)  # required fields and types of the SDK's models
    final = frames[-1][1]["response"]
    Response.model_validate(final)
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"]
    item_ids = {data["item_id"] for _, data in frames if "item_id" in data}
    assert item_ids == {final["output"][0]["id"]}


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(
        model=MODEL,
        input=ask,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])  # type: ignore[arg-type]
    history = [
        *ask,
        *(item.model_dump(exclude_none=True) for item in first.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 18}'},
    ]
    second = client.responses.create(
        model=MODEL,
        input=history,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="auto",
        max_output_tokens=12,
        temperature=0,
    )
    assert first.status == "completed", first.output
    assert second.output[-1].type in ("message", "function_call")
    assert first.usage is not None and second.usage is not None
    # The call and its result were rendered after turn 1's prompt, which came from the cache.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens


def test_namespace_tools_are_called_with_their_namespace_and_hosted_tools_ignored(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """Codex's request shape: a namespace of function tools next to OpenAI-hosted tools
    (ignored: nothing here runs them); a call comes back with ``namespace`` set, and goes
    back in as history with it."""
    weather = {key: value for key, value in WEATHER.items() if key != "strict"}
    tools = [
        {"type": "namespace", "name": "city", "description": "City tools.", "tools": [weather]},
        {"type": "web_search", "external_web_access": False},
    ]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = {"model": MODEL, "input": ask, "tools": tools, "tool_choice": "required"}
    for stream in (False, True):
        response = http.post(
            "/v1/responses",
            json={**body, "max_output_tokens": 64, "temperature": 0, "stream": stream},
        )
        assert response.status_code == 200, response.text
        if stream:
            done = [e for n, e in sse_events(response) if n == "response.completed"]
            output = done[0]["response"]["output"]
        else:
            output = response.json()["output"]
        [call] = [item for item in output if item["type"] == "function_call"]
        assert (call["namespace"], call["name"]) == ("city", "get_weather")
    history = [
        *ask,
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp_c": 18}'},
    ]
    second = client.responses.create(
        model=MODEL,
        input=history,  # type: ignore[arg-type]
        tools=tools,  # type: ignore[arg-type]
        max_output_tokens=8,
        temperature=0,
    )
    assert second.status in ("completed", "incomplete")
    assert [tool["type"] for tool in second.model_dump()["tools"]] == ["namespace"]


def test_streamed_tool_call(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=64,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    [call] = final.output
    assert call.type == "function_call" and call.arguments == done.arguments
    assert call.id == done.item_id and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])  # type: ignore[arg-type]


def test_json_schema_format(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Describe Paris as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA}},
        max_output_tokens=96,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)
    assert response.text is not None and response.text.format.type == "json_schema"


class City(BaseModel):
    name: str
    population: int


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    response = client.responses.parse(
        model=MODEL,
        input="Describe Paris.",
        text_format=City,
        max_output_tokens=96,
        temperature=0,
    )
    assert isinstance(response.output_parsed, City)


def test_previous_response_id_continues_from_the_cache(client: openai.OpenAI) -> None:
    first = client.responses.create(
        **greedy(instructions="You are terse.", input="My name is Ada. Say hi.")
    )
    second = client.responses.create(
        **greedy(instructions="You are terse.", input="What is my name?"),
        previous_response_id=first.id,
    )
    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    # Turn 2's prompt holds turn 1 (prompt and reply); all of turn 1's prompt was cached.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    # input_items lists the request's own input only.
    items = client.responses.input_items.list(second.id).data
    assert [item.content[0].text for item in items] == ["What is my name?"]  # type: ignore[union-attr]


def test_retrieve_list_and_delete(client: openai.OpenAI) -> None:
    turns = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    created = client.responses.create(**greedy(input=turns))
    got = client.responses.retrieve(created.id)
    assert got.id == created.id and got.output_text == created.output_text
    page = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.id for item in page.data] == [page.first_id, page.last_id] and page.has_more
    every = list(client.responses.input_items.list(created.id, order="asc", limit=1))
    assert [item.content[0].text for item in every] == ["one", "two", "three"]  # type: ignore[union-attr]
    newest = client.responses.input_items.list(created.id).data[0]
    assert newest.content[0].text == "three"  # type: ignore[union-attr]
    assert client.responses.delete(created.id) is None
    for again in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            again(created.id)
        assert caught.value.body["param"] == "response_id"  # type: ignore[index]


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(**greedy(store=False))
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(**greedy(previous_response_id=response.id))
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_unknown_id_is_404_in_openai_envelope(http: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/responses/resp_missing"),
        ("DELETE", "/v1/responses/resp_missing"),
        ("GET", "/v1/responses/resp_missing/input_items"),
    ]:
        reply = http.request(method, path)
        assert reply.status_code == 404
        assert reply.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools.0"),
        (
            {"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "custom"}]}]},
            "tools.0.tools.0",
        ),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.0.content.0",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input.0.content.0.file_id",
        ),
        ({"include": ["message.output_text.logprobs"]}, "include.0"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ],
)
def test_refused_by_name(http: httpx.Client, change: dict[str, Any], param: str) -> None:
    reply = http.post("/v1/responses", json={"model": MODEL, "input": "hi", **change})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_cancelled_stream_leaves_the_server_serving(
    client: openai.OpenAI, server: RunningServer
) -> None:
    stream = client.responses.create(
        **greedy(max_output_tokens=400, extra_body={"logit_bias": NO_EOG}), stream=True
    )
    seen = []
    for event in stream:
        seen.append(event.type)
        if seen.count("response.output_text.delta") == 3:
            break
    stream.close()
    assert seen[:2] == ["response.created", "response.in_progress"]
    after = client.responses.create(**greedy())
    assert after.status == "completed" and after.output_text


@pytest.fixture(scope="module")
def vision(vision_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vision_server.v1, api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_image_input_on_a_vision_model(vision: openai.OpenAI) -> None:
    def ask(*parts: dict[str, Any]) -> Any:
        return vision.responses.create(
            model=TINY_VISION,
            input=[{"role": "user", "content": [*parts, {"type": "input_text", "text": "What?"}]}],  # type: ignore[list-item]
            max_output_tokens=4,
            temperature=0,
            store=False,
        )

    text_only = ask().usage.input_tokens
    green = png((0, 200, 0))
    by_data = ask({"type": "input_image", "image_url": data_uri(green), "detail": "auto"})
    by_path = ask({"type": "input_image", "image_url": "green.png", "detail": "auto"})
    assert by_data.usage.input_tokens > text_only + 16  # the tiny projector's 16 tokens
    assert by_path.output_text == by_data.output_text


def test_reasoning_item_from_a_thinking_model(qwen_server: RunningServer) -> None:
    with openai.OpenAI(base_url=qwen_server.v1, api_key="unused", max_retries=0) as sdk:
        response = sdk.responses.create(
            model=QWEN_THINKING, input="Think: 2 + 2?", max_output_tokens=8, temperature=0
        )
        with sdk.responses.stream(
            model=QWEN_THINKING, input="Think: 2 + 2?", max_output_tokens=8, temperature=0
        ) as stream:
            kinds = [event.type for event in stream]
    # The random tiny model never closes its <think>: all it wrote is reasoning.
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert response.status == "incomplete" and response.usage is not None
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 8
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    assert kinds[-1] == "response.incomplete"
