"""Structured outputs through the SDK's own helpers: ``.parse()`` and ``.stream()`` with
pydantic models send strict JSON schemas ($defs/$ref, anyOf with null, enums, lists);
the reply is grammar-constrained to them."""

from __future__ import annotations

import enum
import json
from typing import Literal

import openai
from pydantic import BaseModel

from tests.e2e.conftest import MODEL


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str
    postcode: str | None


class Person(BaseModel):
    name: str
    age: int
    role: Literal["admin", "user"]
    favourite: Colour
    address: Address
    previous: list[Address]
    nickname: str | None


ASK = [{"role": "user", "content": "Invent a person who lives in Lyon, as JSON."}]


def test_parse_returns_a_parsed_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=400,
        temperature=0,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Person)
    assert Person.model_validate_json(message.content or "") == message.parsed


def test_parse_streamed(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=400,
        temperature=0,
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


def test_json_object(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        # One worked example: greedy decoding of a 270M model otherwise may invent keys
        # until max_tokens (the reply is valid JSON so far either way).
        messages=[
            {"role": "user", "content": "JSON object for: name Ann, age 5."},
            {"role": "assistant", "content": '{"name": "Ann", "age": 5}'},
            {"role": "user", "content": "JSON object for: name Tom, age 3."},
        ],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    assert response.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(response.choices[0].message.content or ""), dict)
