"""The Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) through the
official ``anthropic`` SDK and raw httpx, on the bundled Gemma 3 270M (greedy, short
replies), the tiny vision Gemma 3 and the tiny Qwen3-VL with its thinking template."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from tests.conftest import API_KEY, QWEN_THINKING, TINY_VISION, RunningServer
from tests.e2e.conftest import MODEL
from tests.e2e.test_vision import IMAGE_TOKENS, png

GREEDY: dict[str, Any] = {"temperature": 0.0}  # not an SDK argument any more: extra_body
ASK = [{"role": "user", "content": "Write one sentence about the sea."}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": WEATHER_SCHEMA,
}
FORCED = {"type": "tool", "name": "get_weather"}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def claude(server: RunningServer) -> Iterator[anthropic.Anthropic]:
    """The official SDK, unmodified (it sends the key as ``x-api-key``)."""
    with anthropic.Anthropic(
        base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120
    ) as sdk:
        yield sdk


def create(claude: anthropic.Anthropic, **fields: Any) -> anthropic.types.Message:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "messages": ASK, **fields}
    return claude.messages.create(**body, extra_body=GREEDY)


def test_create_text(claude: anthropic.Anthropic) -> None:
    reply = create(claude, system="You are terse.", metadata={"user_id": "u-1"})
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.id.startswith("msg_")
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text.strip()
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert 1 <= reply.usage.output_tokens <= 12
    short = create(claude, max_tokens=2)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2


def test_max_tokens_past_the_context_is_fitted_not_refused(claude: anthropic.Anthropic) -> None:
    """Claude Code always sends max_tokens 32000; the test server's n_ctx is 2048: the
    reply may use what the prompt leaves. A prompt alone over n_ctx is still a 400."""
    reply = create(claude, max_tokens=32_000, stop_sequences=[" "])
    assert reply.stop_reason in ("stop_sequence", "end_turn")
    assert reply.usage.output_tokens < 2048
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(claude, max_tokens=32_000, messages=[{"role": "user", "content": "word " * 5000}])
    assert "context" in str(caught.value)


def test_count_tokens_equals_the_replys_prompt(claude: anthropic.Anthropic) -> None:
    fields: dict[str, Any] = {"system": "Answer briefly.", "tools": [WEATHER], "messages": ASK}
    counted = claude.messages.count_tokens(model=MODEL, **fields).input_tokens
    reply = create(claude, max_tokens=1, **fields)
    usage = reply.usage
    assert counted == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    bare = claude.messages.count_tokens(model=MODEL, messages=ASK).input_tokens
    assert bare < counted  # the system prompt and the tool's declaration count


def test_stream_text_equals_create(claude: anthropic.Anthropic) -> None:
    plain = create(claude)
    with claude.messages.stream(
        model=MODEL, max_tokens=12, messages=ASK, extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == plain.content[0].text
    assert final.content[0].type == "text" and final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.output_tokens == plain.usage.output_tokens


def tool_use(reply: anthropic.types.Message) -> anthropic.types.ToolUseBlock:
    uses = [block for block in reply.content if block.type == "tool_use"]
    assert len(uses) == 1 and reply.stop_reason == "tool_use"
    assert uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, WEATHER_SCHEMA)
    return uses[0]


def test_tools_round_trip(claude: anthropic.Anthropic) -> None:
    reply = create(claude, max_tokens=40, tools=[WEATHER], tool_choice=FORCED, messages=WEATHER_ASK)
    call = tool_use(reply)
    with claude.messages.stream(
        model=MODEL,
        max_tokens=40,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=FORCED,  # type: ignore[arg-type]
        messages=WEATHER_ASK,  # type: ignore[arg-type]
        extra_body=GREEDY,
    ) as stream:
        streamed = stream.get_final_message()
    assert tool_use(streamed).input == call.input  # the SDK rebuilt it from input_json_deltas
    turns: list[Any] = [
        *WEATHER_ASK,
        {"role": "assistant", "content": [block.model_dump() for block in reply.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}],
        },
    ]
    fields: dict[str, Any] = {"tools": [WEATHER], "messages": turns}
    answer = create(claude, max_tokens=12, **fields)
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    first = claude.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=WEATHER_ASK)
    second = claude.messages.count_tokens(model=MODEL, **fields)
    assert second.input_tokens > first.input_tokens + 5  # the call and its result are in the prompt
    failed = [{**turns[2]["content"][0], "is_error": True}]
    errored = claude.messages.count_tokens(
        model=MODEL, tools=[WEATHER], messages=[*turns[:2], {"role": "user", "content": failed}]
    )
    assert errored.input_tokens > second.input_tokens  # "Error: " marks the result


def test_structured_output(claude: anthropic.Anthropic) -> None:
    reply = create(
        claude,
        max_tokens=40,
        messages=WEATHER_ASK,
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
    )
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), WEATHER_SCHEMA)


def test_stop_sequences(claude: anthropic.Anthropic) -> None:
    text = create(claude, max_tokens=16).content[0].text
    cut = len(text) // 2
    stop = text[cut : cut + 3]
    before = text[: text.index(stop)].rstrip()
    for stops in ([stop], ["zzqx", stop]):
        reply = create(claude, max_tokens=16, stop_sequences=stops)
        assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
        assert reply.content[0].text == before
        with claude.messages.stream(
            model=MODEL, max_tokens=16, messages=ASK, stop_sequences=stops, extra_body=GREEDY
        ) as stream:
            final = stream.get_final_message()
        assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    # A reply that ends its turn (the format's grammar closes it) with a stop that never
    # came is no stop_sequence.
    ended = create(
        claude,
        max_tokens=40,
        stop_sequences=["zzqx"],
        messages=WEATHER_ASK,
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
    )
    assert ended.stop_reason == "end_turn" and ended.stop_sequence is None


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The typed events of a stream, each checked to carry its name as its ``type``."""
    out = []
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = json.loads(line.removeprefix("data: "))
            assert name is not None and data["type"] == name, (name, data)
            out.append((name, data))
            name = None
    return out


def check_blocks(seq: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Blocks open, take deltas and close in index order, one at a time; their starts."""
    starts, open_index = [], None
    for name, data in seq:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(starts)
            open_index = data["index"]
            starts.append(data["content_block"])
        elif name == "content_block_delta":
            assert data["index"] == open_index
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    assert open_index is None
    return starts


def test_raw_event_sequence(server: RunningServer) -> None:
    body = {"model": MODEL, "max_tokens": 12, "messages": ASK, "stream": True, **GREEDY}
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "x"}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/messages", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        seq = events(response)
    names = [name for name, _ in seq]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = seq[0][1]["message"]
    assert (
        start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    )
    assert check_blocks(seq) == [{"type": "text", "text": ""}]
    assert {data["delta"]["type"] for name, data in seq if name == "content_block_delta"} == {
        "text_delta"
    }
    delta = seq[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    usage = delta["usage"]
    prompt = usage["input_tokens"] + usage["cache_read_input_tokens"]
    assert prompt == start["usage"]["input_tokens"] and 1 <= usage["output_tokens"] <= 12


def test_raw_tool_stream(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 40,
        "messages": WEATHER_ASK,
        "tools": [WEATHER],
        "tool_choice": FORCED,
        "stream": True,
        **GREEDY,
    }
    with http.stream("POST", "/v1/messages", json=body) as response:  # Authorization: Bearer
        seq = events(response)
    (start,) = check_blocks(seq)
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["input"] == {}
    partial = "".join(
        data["delta"]["partial_json"] for name, data in seq if name == "content_block_delta"
    )
    jsonschema.validate(json.loads(partial), WEATHER_SCHEMA)
    assert seq[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_thinking_stream(qwen_server: RunningServer) -> None:
    body = {
        "model": QWEN_THINKING,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hi"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stream": True,
        **GREEDY,
    }
    with httpx.stream("POST", f"{qwen_server.base_url}/v1/messages", json=body, timeout=120) as r:
        seq = events(r)
    starts = check_blocks(seq)
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    kinds = {data["delta"]["type"] for name, data in seq if name == "content_block_delta"}
    assert "thinking_delta" in kinds
    sdk = anthropic.Anthropic(base_url=qwen_server.base_url, api_key="unused", max_retries=0)
    fields = {k: v for k, v in body.items() if k not in ("stream", *GREEDY)}
    reply = sdk.messages.create(**fields, extra_body=GREEDY)
    assert reply.content[0].type == "thinking" and reply.content[0].thinking
    off = sdk.messages.count_tokens(
        model=QWEN_THINKING, messages=body["messages"], thinking={"type": "disabled"}
    )
    on = sdk.messages.count_tokens(model=QWEN_THINKING, messages=body["messages"])
    assert off.input_tokens > on.input_tokens  # the template closes an empty <think> block


def test_cancel_mid_stream_frees_the_server(
    server: RunningServer, claude: anthropic.Anthropic
) -> None:
    body = {"model": MODEL, "max_tokens": 400, "messages": ASK, "stream": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/messages", json=body, headers={"x-api-key": API_KEY}
    ) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: message_start"
    reply = create(claude, max_tokens=2)  # the next request is served
    assert reply.usage.output_tokens == 2


def test_image(vision_server: RunningServer, media: tuple[Path, str]) -> None:
    root, base_url = media
    sdk = anthropic.Anthropic(base_url=vision_server.base_url, api_key="unused", max_retries=0)
    raw = (root / "green.png").read_bytes()
    sources = [
        {"type": "base64", "media_type": "image/png", "data": base64.b64encode(raw).decode()},
        {"type": "url", "url": f"{base_url}/green.png"},
    ]
    replies = []
    for source in sources:
        content = [{"type": "image", "source": source}, {"type": "text", "text": "Color?"}]
        replies.append(
            sdk.messages.create(
                model=TINY_VISION,
                max_tokens=4,
                messages=[{"role": "user", "content": content}],  # type: ignore[typeddict-item]
                extra_body=GREEDY,
            )
        )
    assert replies[0].content == replies[1].content
    text_only = sdk.messages.count_tokens(
        model=TINY_VISION, messages=[{"role": "user", "content": "Color?"}]
    ).input_tokens
    usage = replies[0].usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) - text_only == IMAGE_TOKENS + 3
    red = base64.b64encode(png((255, 0, 0))).decode()
    with_red = sdk.messages.count_tokens(
        model=TINY_VISION,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": red},
                    },
                    {"type": "text", "text": "Color?"},
                ],
            }
        ],
    )
    assert with_red.input_tokens == text_only + IMAGE_TOKENS + 3


# ---- errors: Anthropic's shape on /v1/messages*, OpenAI's elsewhere ------------------------


def anthropic_error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert body["request_id"] == response.headers["x-request-id"]
    return str(body["error"]["message"])


def test_sdk_errors(claude: anthropic.Anthropic, server: RunningServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        create(claude, messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}])
    assert bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "'document'" in bad.value.message
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.count_tokens(model=MODEL, messages=ASK)  # type: ignore[arg-type]
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind"),
    [
        ("POST", "/v1/messages", {"model": MODEL, "messages": ASK}, 400, "invalid_request_error"),
        (
            "POST",
            "/v1/messages",
            {"model": MODEL, "max_tokens": 4, "messages": []},
            400,
            "invalid_request_error",
        ),
        (
            "POST",
            "/v1/messages/count_tokens",
            {"model": "nope", "messages": ASK},
            404,
            "not_found_error",
        ),
        (
            "POST",
            "/v1/messages",
            {**GREEDY, "model": MODEL, "max_tokens": 4, "messages": ASK, "temperature": 2},
            400,
            "invalid_request_error",
        ),
        ("GET", "/v1/messages", None, 405, "invalid_request_error"),
        ("POST", "/v1/messages/batches", {}, 404, "not_found_error"),
    ],
)
def test_error_shapes(
    http: httpx.Client, method: str, path: str, body: Any, status: int, kind: str
) -> None:
    message = anthropic_error(http.request(method, path, json=body), status, kind)
    if path == "/v1/messages" and status == 400 and "max_tokens" not in json.dumps(body):
        assert "max_tokens" in message


def test_error_shapes_outside_the_sdk(http: httpx.Client, server: RunningServer) -> None:
    bad_json = http.post("/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert "not valid JSON" in anthropic_error(bad_json, 400, "invalid_request_error")
    too_big = http.post("/v1/messages", content=b"x" * (1024 * 1024 + 1))
    anthropic_error(too_big, 413, "request_too_large")
    no_key = httpx.post(f"{server.base_url}/v1/messages", json={})
    anthropic_error(no_key, 401, "authentication_error")
    openai_side = http.post("/v1/chat/completions", json={"model": "nope", "messages": ASK})
    assert openai_side.status_code == 404 and set(openai_side.json()) == {"error"}
