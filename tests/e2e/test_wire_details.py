"""Wire details clients read: ``system_fingerprint`` on every reply and chunk, a
``json_schema`` format without a ``name``, and llama.cpp's ``json_object`` + ``schema``."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL

FINGERPRINT = re.compile(r"^fp_[0-9a-f]{12}$")
ASK = [{"role": "user", "content": "Describe a cat as JSON."}]
CAT = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "legs": {"type": "integer"}},
    "required": ["name", "legs"],
    "additionalProperties": False,
}


def test_fingerprint_is_set_and_stable(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    second = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert first.system_fingerprint is not None
    assert FINGERPRINT.match(first.system_fingerprint)
    assert second.system_fingerprint == first.system_fingerprint
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    prints = {chunk.system_fingerprint for chunk in stream}
    assert prints == {first.system_fingerprint}


def structured(http: httpx.Client, response_format: dict[str, Any]) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": ASK,
            "response_format": response_format,
            "max_tokens": 80,
            "temperature": 0,
        },
    )


def test_json_schema_without_a_name_is_enforced(http: httpx.Client) -> None:
    response = structured(http, {"type": "json_schema", "json_schema": {"schema": CAT}})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), CAT)


def test_json_object_with_a_schema_follows_the_schema(http: httpx.Client) -> None:
    response = structured(http, {"type": "json_object", "schema": CAT})
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["message"]["content"]), CAT)


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema", "schema": CAT}, "response_format.schema"),
        ({"type": "json_object", "schema": {"type": "string", "format": "hostname"}}, None),
    ],
)
def test_misplaced_or_unenforceable_schema_is_a_400(
    http: httpx.Client, response_format: dict[str, Any], param: str | None
) -> None:
    response = structured(http, response_format)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == (param or "response_format.schema")
