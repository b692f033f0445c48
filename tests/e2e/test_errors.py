"""Bad requests get the OpenAI error envelope with the right status; the server lives on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import RunningServer, model_entry
from tests.e2e.conftest import MODEL

OK_MESSAGES = [{"role": "user", "content": "Hi"}]
LEAKS = ("Traceback", "/work/", "/tmp/", ".py", "0x7f", "pydantic", "jinja")


def assert_envelope(
    response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for leak in LEAKS:
        assert leak not in response.text, (leak, response.text)
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(autouse=True)
def server_still_answers(http: httpx.Client) -> Any:
    yield
    after = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1}
    )
    assert after.status_code == 200, after.text


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "gemma-3-270m", "messages": [', b"not json", b"\xff\xfe{}", b""],
    ids=["truncated", "garbage", "invalid-utf8", "empty"],
)
def test_malformed_json(http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_envelope(response, 400)


@pytest.mark.parametrize("body", ['"a string"', "[1, 2]", "42", "null"])
def test_body_not_an_object(http: httpx.Client, body: str) -> None:
    response = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert_envelope(response, 400)


def test_wrong_content_type(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        content=json.dumps({"model": MODEL, "messages": OK_MESSAGES}),
        headers={"Content-Type": "text/plain"},
    )
    assert_envelope(response, 415)


def test_body_over_cap_is_413(http: httpx.Client) -> None:
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    assert_envelope(http.post("/v1/chat/completions", json=huge), 413)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [42]}, "messages.0"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.user.content.str"),
        ({"messages": [{"role": "user"}]}, "messages.0.user.content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool.tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                    }
                ]
            },
            None,
        ),
        ({"model": None}, "model"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5.5}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"frequency_penalty": -9}, "frequency_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"stream": "yes"}, "stream"),
        ({"stop": ["x"] * 1000}, "stop"),
        ({"stop": "x" * 100_000}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {str(i): 1 for i in range(5000)}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias.5"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_invalid_fields_are_400_with_param(
    http: httpx.Client, patch: dict[str, Any], param: str | None
) -> None:
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    error = assert_envelope(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers(http: httpx.Client, literal: str) -> None:
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}'
    response = http.post(
        "/v1/chat/completions",
        content=raw % (MODEL, literal),
        headers={"Content-Type": "application/json"},
    )
    assert_envelope(response, 400)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"n": 129}, "n"),
        ({"n": 100}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "n",
                        "schema": {"type": "integer", "minimum": 3},
                    },
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"chat_template": "{{ 7*7 }}"}, "chat_template"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"store": True}, "store"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ],
)
def test_unsupported_options_are_refused_by_name(
    http: httpx.Client, patch: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, **patch}
    assert_envelope(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_schema_keyword_refusal_names_the_keyword(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=OK_MESSAGES,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
        )
    assert "minimum" in str(info.value)


def test_unknown_model_is_404(client: openai.OpenAI, http: httpx.Client) -> None:
    body = {"model": "no-such-model", "messages": OK_MESSAGES}
    assert_envelope(http.post("/v1/chat/completions", json=body), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=OK_MESSAGES)  # type: ignore[arg-type]


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded(http: httpx.Client, stream: bool) -> None:
    body = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 10**9, "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    assert not response.text.startswith("data:")
    assert_envelope(response, 400, code="context_length_exceeded")


def test_prompt_longer_than_context(http: httpx.Client) -> None:
    long_text = "word " * 5000  # over n_ctx 2048 tokens, under the character cap
    body = {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "stream": True}
    assert_envelope(
        http.post("/v1/chat/completions", json=body), 400, code="context_length_exceeded"
    )


def test_prompt_over_character_cap(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a" * 300_000}]}
    assert_envelope(http.post("/v1/chat/completions", json=body), 400, param="messages")


def test_lone_surrogate(http: httpx.Client) -> None:
    raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}'
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert_envelope(response, 400)


def test_roles_must_alternate_for_gemma(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "assistant", "content": "I start"}]}
    error = assert_envelope(http.post("/v1/chat/completions", json=body), 400, param="messages")
    assert "alternate" in error["message"]


def test_image_to_text_only_model(http: httpx.Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [image]}]}
    error = assert_envelope(http.post("/v1/chat/completions", json=body), 400)
    assert "image" in error["message"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dGVzdC1rZXk="}],
    ids=["missing", "wrong", "wrong-scheme"],
)
def test_api_key_required(server: RunningServer, headers: dict[str, str]) -> None:
    body = {"model": MODEL, "messages": OK_MESSAGES}
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        response = httpx.request(method, server.base_url + path, json=body, headers=headers)
        assert_envelope(response, 401, code="invalid_api_key")
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_wrong_key_via_sdk(server: RunningServer) -> None:
    with (
        openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.chat.completions.create(model=MODEL, messages=OK_MESSAGES)  # type: ignore[arg-type]


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/nothing"), 404)
    assert_envelope(http.get("/v1/chat/completions"), 405)


def test_every_response_has_request_id(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"model": "x"})
    assert len(response.headers["x-request-id"]) == 32


def test_failed_model_does_not_take_down_others(
    server_factory: Callable[..., RunningServer], bundled_gguf: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    running = server_factory(
        [model_entry("broken", corrupt), model_entry("good", bundled_gguf)], api_key=None
    )
    health = httpx.get(f"{running.base_url}/health").json()
    assert health == {"status": "ok", "models": {"broken": "failed", "good": "ready"}}
    body = {"model": "broken", "messages": OK_MESSAGES, "max_tokens": 1}
    error = assert_envelope(httpx.post(f"{running.v1}/chat/completions", json=body), 503)
    assert error["code"] == "model_load_failed"
    assert str(corrupt) not in error["message"]
    good = httpx.post(f"{running.v1}/chat/completions", json={**body, "model": "good"})
    assert good.status_code == 200
