"""ggufserve.grammar against real llama.cpp: every grammar compiles with the bundled Gemma 3
vocabulary, and accepts (or rejects) texts token by token as a sampler would."""

from __future__ import annotations

import ctypes
import enum
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from ggufserve.grammar import (
    JSON_OBJECT_GBNF,
    CallSyntax,
    UnsupportedSchemaError,
    check_schema,
    json_schema_gbnf,
    tool_calls_gbnf,
)

QWEN = CallSyntax("arguments", "<tool_call>\n", "\n</tool_call>", "\n", json_list=False)
GEMMA = CallSyntax("parameters", "", "", ", ", json_list=True, closing="\n```")


class Grammars:
    """Compiles GBNF with the real vocabulary and feeds it tokenized text."""

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def _sampler(self, gbnf: str) -> Any:
        return llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")

    def compiles(self, gbnf: str) -> bool:
        sampler = self._sampler(gbnf)
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
        candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def accepts(self, gbnf: str, text: str) -> bool:
        """Whether ``text`` is a complete sentence of the grammar (EOG allowed after it)."""
        sampler = self._sampler(gbnf)
        assert sampler, "grammar does not compile"
        try:
            for token in self.llm.tokenize(text.encode(), add_bos=False, special=True):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, llama_cpp.llama_vocab_eos(self.vocab))
        finally:
            llama_cpp.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def grammars(bundled_gguf: Path) -> Iterator[Grammars]:
    llm = llama_cpp.Llama(str(bundled_gguf), vocab_only=True, verbose=False)
    yield Grammars(llm)
    llm.close()


# ---- the schemas the openai SDK sends for client.chat.completions.parse() ---------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int


class Dog(BaseModel):
    kind: Literal["dog"]
    weight: float


class Person(BaseModel):
    name: str = Field(description="full name")
    age: int
    color: Color
    mood: Literal["happy", "sad"]
    home: Address
    work: Address | None
    past: list[Address]
    tags: list[str]
    pet: Cat | Dog = Field(discriminator="kind")
    friend: Cat | Dog
    ok: bool


class Node(BaseModel):
    value: int
    children: list[Node]


PERSON = Person(
    name='Ann "Jo" \\ é',
    age=42,
    color=Color.GREEN,
    mood="sad",
    home=Address(city="Paris", zip="75001"),
    work=None,
    past=[Address(city="Oslo"), Address(city="Rome", zip=None)],
    tags=[],
    pet=Cat(kind="cat", lives=9),
    friend=Dog(kind="dog", weight=-1.5e3),
    ok=True,
)


def dumps(model: BaseModel, *, compact: bool) -> str:
    data = model.model_dump(mode="json")
    return json.dumps(data, separators=(",", ":")) if compact else json.dumps(data)


@pytest.fixture(scope="module")
def person_gbnf(grammars: Grammars) -> str:
    gbnf = json_schema_gbnf(to_strict_json_schema(Person))
    assert grammars.compiles(gbnf)
    return gbnf


@pytest.mark.parametrize("compact", [True, False])
def test_openai_parse_schema_accepts_instances(
    grammars: Grammars, person_gbnf: str, compact: bool
) -> None:
    check_schema(to_strict_json_schema(Person))
    assert grammars.accepts(person_gbnf, dumps(PERSON, compact=compact))
    other = PERSON.model_copy(update={"work": Address(city="Lyon"), "tags": ["a", "b"]})
    assert grammars.accepts(person_gbnf, dumps(other, compact=compact))


def _person(**changes: Any) -> str:
    data = PERSON.model_dump(mode="json")
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...})


@pytest.mark.parametrize(
    "text",
    [
        _person(color="blue"),  # enum value
        _person(mood="angry"),  # Literal value
        _person(age="42"),  # wrong type
        _person(age=4.5),  # number for integer
        _person(ok=...),  # missing required
        _person(extra=1),  # additionalProperties false
        _person(home={"city": "Paris"}),  # nested required (zip: str | None, still required)
        _person(home=None),  # null where not allowed
        _person(pet={"kind": "cow", "lives": 1}),  # no union branch
        _person(pet={"kind": "cat", "weight": 1.0}),  # branch fields mixed
        _person(name="ok").replace('"ok"', '"raw\ncontrol"'),  # JSON forbids raw controls
        dumps(PERSON, compact=True) + "x",  # trailing text
    ],
)
def test_openai_parse_schema_rejects_invalid(
    grammars: Grammars, person_gbnf: str, text: str
) -> None:
    assert not grammars.accepts(person_gbnf, text)


def test_recursive_model(grammars: Grammars) -> None:
    gbnf = json_schema_gbnf(to_strict_json_schema(Node))
    tree = Node(value=1, children=[Node(value=2, children=[Node(value=3, children=[])])])
    assert grammars.accepts(gbnf, tree.model_dump_json())
    assert not grammars.accepts(gbnf, '{"value": 1, "children": [{"value": 2}]}')


def test_pretty_printed_calls_are_accepted(grammars: Grammars) -> None:
    gemma = tool_calls_gbnf(TOOLS, GEMMA, max_calls=3)
    assert grammars.accepts(gemma, json.dumps([json.loads(PARIS_GEMMA)] * 2, indent=4))
    assert not grammars.accepts(gemma, '{\n\n\n"name": "ping", "parameters": {}}')  # 3 newlines
    # Structured outputs stay compact (one space at most between tokens).
    assert not grammars.accepts(JSON_OBJECT_GBNF, json.dumps({"a": 1}, indent=2))


def test_json_object(grammars: Grammars) -> None:
    assert grammars.accepts(JSON_OBJECT_GBNF, '{"a": [1, {"b": null}], "c": "x"}')
    assert grammars.accepts(JSON_OBJECT_GBNF, "{}")
    for text in ('[{"a": 1}]', '"x"', '{"a": 1', '{"a": "raw\ncontrol"}'):
        assert not grammars.accepts(JSON_OBJECT_GBNF, text)


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        ({"type": "string", "format": "date"}, '"2024-02-29"', '"2024-13-01"'),
        ({"type": "string", "format": "date-time"}, '"2024-02-29T10:00:00Z"', '"2024-02-29"'),
        ({"type": "string", "format": "time"}, '"23:59:59.123+02:00"', '"24:00:00Z"'),
        ({"format": "uuid"}, '"0123abcd-0000-4000-8000-00000000abcd"', '"0123abcd"'),
        ({"type": "string", "minLength": 2, "maxLength": 3}, '"abc"', '"abcd"'),
        ({"type": "string", "maxLength": 1000}, json.dumps("x" * 1000), json.dumps("x" * 1001)),
        ({"type": ["string", "null"], "maxLength": 2}, "null", '"abc"'),
        ({"type": ["string", "integer"]}, "12", "1.5"),
        ({"type": ["integer", "null"], "enum": [1, None]}, "null", "2"),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 1}, "[1, 2]", "[]"),
        ({"type": "array", "maxItems": 1}, '["x"]', "[1, 2]"),
        ({"prefixItems": [{"type": "integer"}, {"type": "string"}]}, '[1, "a"]', "[1]"),
        ({"properties": {"a": {"const": {"x": [1]}}}}, '{"a": {"x": [1]}}', '{"a": {"x": []}}'),
        (
            {"type": "object", "additionalProperties": {"type": "integer"}},
            '{"a": 1, "b": 2}',
            '{"a": "1"}',
        ),
        (
            {"properties": {"a": {"type": "integer"}}, "additionalProperties": True},
            '{"a": 1}',
            '{"b": 1, "a": "x"}',  # closed: extras could repeat "a" with any value
        ),
        ({"properties": {"a": {}}, "required": ["a"]}, '{"a": [null, 1.5]}', "{}"),
        ({"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"const": 1}}}, "1", "2"),
        ({"$ref": "#/definitions/a~1b", "definitions": {"a/b": {"type": "null"}}}, "null", "0"),
        ({"type": "boolean", "title": "t", "$comment": "c", "examples": [True]}, "false", "0"),
    ],
)
def test_schema_keywords(grammars: Grammars, schema: dict[str, Any], good: str, bad: str) -> None:
    gbnf = json_schema_gbnf(schema)
    assert grammars.accepts(gbnf, good)
    assert not grammars.accepts(gbnf, bad)


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (r"^\d{3}-\d{2,4}$", "123-45", "12-345"),
        (r"^[A-Z][a-z]+(?: [A-Z][a-z]+)*$", "Ada Lovelace", "ada"),
        (r"^v\d+\.\d+$", "v1.20", "v1x20"),
        (r"^(cat|dog)s?$", "dogs", "cow"),
        (r"abc", "xxabcyy", "xxabyy"),  # unanchored: a search
        (r"^[^0-9]+$", "a-b", "a1"),
        (r"^.+$", "any thing", ""),
        (r'^say "\w+"\\$', 'say \\"hi\\"\\\\', 'say "hi"'),  # JSON escapes of " and \
        (r"^\u00e9+?$", "éé", "e"),
    ],
)
def test_patterns(grammars: Grammars, pattern: str, good: str, bad: str) -> None:
    gbnf = json_schema_gbnf({"type": "string", "pattern": pattern})
    assert grammars.accepts(gbnf, f'"{good}"')
    assert not grammars.accepts(gbnf, f'"{bad}"')


def test_pattern_never_admits_raw_quotes_or_controls(grammars: Grammars) -> None:
    for pattern in (r"^.*$", r"^[^a]*$", r"^[ -~]*$", r"^\D*$"):
        gbnf = json_schema_gbnf({"type": "string", "pattern": pattern})
        assert grammars.accepts(gbnf, '"ok"')
        for text in ('"a"b"', '"a\\b"', '"a\tb"'):
            assert not grammars.accepts(gbnf, text), (pattern, text)


def test_defs_never_shadowed_by_properties(grammars: Grammars) -> None:
    # The converter looks a $ref up by its last segment: a rule of that name must be it.
    schema = {
        "$defs": {"def0": {"type": "integer"}, "string": {"const": "s"}},
        "properties": {
            "def0": {"type": "string"},
            "a": {"$ref": "#/$defs/def0"},
            "b": {"$ref": "#/$defs/string"},
        },
        "required": ["def0", "a", "b"],
    }
    gbnf = json_schema_gbnf(schema)
    assert grammars.accepts(gbnf, '{"def0": "x", "a": 1, "b": "s"}')
    assert not grammars.accepts(gbnf, '{"def0": "x", "a": "y", "b": "s"}')
    assert not grammars.accepts(gbnf, '{"def0": "x", "a": 1, "b": "t"}')


# ---- tool calls -------------------------------------------------------------------------


def weather_tool() -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"enum": ["c", "f"]},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }


def item_tool(name: str, item: dict[str, Any]) -> dict[str, Any]:
    """A tool whose parameters use a $defs entry named like every other's."""
    parameters = {
        "$defs": {"Item": item},
        "type": "object",
        "properties": {"item": {"$ref": "#/$defs/Item"}},
        "required": ["item"],
    }
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def strict(tool: dict[str, Any]) -> dict[str, Any]:
    """The tool with ``strict: true``: every keyword of its schema enforced, or refused."""
    return {**tool, "function": {**tool["function"], "strict": True}}


TOOLS = [
    weather_tool(),
    {"type": "function", "function": {"name": "ping"}},
    item_tool("add", {"properties": {"n": {"type": "integer"}}, "required": ["n"]}),
    item_tool("tag", {"properties": {"t": {"type": "string"}}, "required": ["t"]}),
]
PARIS_QWEN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PING_QWEN = '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>'
PARIS_GEMMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
ADD_GEMMA = '{"name": "add", "parameters": {"item": {"n": 2}}}'


def test_qwen_calls(grammars: Grammars) -> None:
    single = tool_calls_gbnf(TOOLS, QWEN, max_calls=1)
    several = tool_calls_gbnf(TOOLS, QWEN, max_calls=3)
    assert grammars.accepts(single, PARIS_QWEN)
    assert grammars.accepts(single, PING_QWEN)
    assert not grammars.accepts(single, f"{PARIS_QWEN}\n{PING_QWEN}")
    assert grammars.accepts(several, f"{PARIS_QWEN}\n{PING_QWEN}\n{PARIS_QWEN}")
    assert not grammars.accepts(several, "\n".join([PARIS_QWEN] * 4))  # max_calls
    bad = [
        PARIS_QWEN.replace("get_weather", "get_weather2"),  # unknown tool
        PARIS_QWEN.replace('"Paris"', "7"),  # argument type
        PARIS_QWEN.replace('"city"', '"town"'),  # missing required / extra property
        PARIS_QWEN.replace('"Paris"}', '"Paris", "unit": "k"}'),  # enum
        '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>',
        PING_QWEN.replace("{}", '{"x": 1}'),  # no parameters: no arguments
        PARIS_QWEN.replace("<tool_call>\n", ""),
        PARIS_QWEN.replace("arguments", "parameters"),
    ]
    for text in bad:
        assert not grammars.accepts(several, text), text


def test_gemma_calls(grammars: Grammars) -> None:
    single = tool_calls_gbnf(TOOLS, GEMMA, max_calls=1)
    several = tool_calls_gbnf(TOOLS, GEMMA, max_calls=3)
    pair = f"[{PARIS_GEMMA}, {ADD_GEMMA}]"
    for gbnf in (single, several):
        assert grammars.accepts(gbnf, PARIS_GEMMA)
        assert grammars.accepts(gbnf, f"[{PARIS_GEMMA}]")
        assert grammars.accepts(gbnf, PARIS_GEMMA + "\n```")
        assert not grammars.accepts(gbnf, PARIS_GEMMA.replace('"city"', '"town"'))
    assert not grammars.accepts(single, pair)
    assert grammars.accepts(several, pair)
    assert grammars.accepts(several, pair.replace(", ", ",") + "\n```")
    assert not grammars.accepts(several, f"[{', '.join([PARIS_GEMMA] * 4)}]")  # max_calls
    assert not grammars.accepts(several, f"{PARIS_GEMMA}, {ADD_GEMMA}")


def test_tools_keep_their_own_defs(grammars: Grammars) -> None:
    gbnf = tool_calls_gbnf(TOOLS, GEMMA, max_calls=3)
    assert grammars.accepts(gbnf, ADD_GEMMA)
    assert grammars.accepts(gbnf, '{"name": "tag", "parameters": {"item": {"t": "x"}}}')
    assert not grammars.accepts(gbnf, '{"name": "add", "parameters": {"item": {"t": "x"}}}')
    assert not grammars.accepts(gbnf, '{"name": "tag", "parameters": {"item": {"n": 2}}}')


def test_lead_before_calls(grammars: Grammars) -> None:
    gbnf = tool_calls_gbnf(TOOLS, QWEN, max_calls=3, lead="</think>")
    assert grammars.accepts(gbnf, f"</think>\n\n{PARIS_QWEN}")
    assert grammars.accepts(gbnf, f"</think>{PARIS_QWEN}")
    assert not grammars.accepts(gbnf, PARIS_QWEN)
    too_much = "\n" * 9
    assert not grammars.accepts(gbnf, f"</think>{too_much}{PARIS_QWEN}")
    assert not grammars.accepts(gbnf, f"</think> hm {PARIS_QWEN}")


def test_sdk_function_tool(grammars: Grammars) -> None:
    tool = dict(openai.pydantic_function_tool(Address, name="save_address"))
    gbnf = tool_calls_gbnf([tool], QWEN, max_calls=1)
    text = '<tool_call>\n{"name": "save_address", "arguments": %s}\n</tool_call>'
    assert grammars.accepts(gbnf, text % Address(city="Nice", zip="06000").model_dump_json())
    assert not grammars.accepts(gbnf, text % '{"city": "Nice"}')


def test_tool_parameters_any_object(grammars: Grammars) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    gbnf = tool_calls_gbnf(tools, GEMMA, max_calls=1)
    assert grammars.accepts(gbnf, '{"name": "f", "parameters": {"x": [1]}}')
    assert not grammars.accepts(gbnf, '{"name": "f", "parameters": [1]}')


# ---- refusals ---------------------------------------------------------------------------


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


DEEP: dict[str, Any] = {"type": "integer"}
for _ in range(70):
    DEEP = {"type": "array", "items": DEEP}


@pytest.mark.parametrize(
    ("schema", "keyword", "path"),
    [
        (obj(age={"type": "integer", "minimum": 0}), "minimum", "properties.age"),
        (obj(age={"type": "number", "exclusiveMaximum": 9}), "exclusiveMaximum", "properties.age"),
        ({"type": "integer", "multipleOf": 2}, "multipleOf", ""),
        ({"not": {"type": "null"}}, "not", ""),
        ({"if": {}, "then": {}, "else": {}}, "if", ""),
        ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties", ""),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames", ""),
        ({"type": "object", "minProperties": 1}, "minProperties", ""),
        ({"type": "array", "uniqueItems": True}, "uniqueItems", ""),
        ({"type": "array", "contains": {"type": "integer"}}, "contains", ""),
        ({"dependentRequired": {"a": ["b"]}}, "dependentRequired", ""),
        ({"unevaluatedProperties": False}, "unevaluatedProperties", ""),
        (obj(mail={"type": "string", "format": "email"}), "format", "properties.mail"),
        ({"type": "string", "format": "uuid4"}, "format", ""),
        ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength", ""),
        ({"type": "string", "pattern": "^(?=a)a$"}, "pattern", ""),
        ({"type": "string", "pattern": r"^(a)\1$"}, "pattern", ""),
        ({"type": "string", "pattern": r"^\bx$"}, "pattern", ""),
        ({"type": "string", "pattern": r"^\p{L}$"}, "pattern", ""),
        ({"type": "string", "pattern": "^a|b$"}, "pattern", ""),
        ({"type": "string", "pattern": "^(a$"}, "pattern", ""),
        ({"type": "string", "pattern": "^a{1001}$"}, "pattern", ""),
        ({"type": "string", "pattern": "^[\n]$"}, "pattern", ""),
        ({"allOf": [obj(a={}), obj(b={})]}, "allOf", ""),
        ({"$ref": "https://example.com/s.json"}, "$ref", ""),
        ({"$ref": "#/$defs/missing"}, "$ref", ""),
        (
            {"$ref": "#/$defs/A", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}]}}},
            "$ref",
            "$defs.A",
        ),
        (
            {"$defs": {"A": {"minimum": 1}}, "properties": {"a": {"$ref": "#/$defs/A"}}},
            "minimum",
            "$defs.A",
        ),
        ({"$ref": "#/$defs/A", "type": "object"}, "type", ""),
        ({"anyOf": [{"type": "string"}], "maxLength": 1}, "maxLength", ""),
        ({"anyOf": []}, "anyOf", ""),
        ({"enum": ["a"], "maxLength": 1}, "maxLength", ""),
        ({"type": "string", "enum": ["a", 1]}, "enum", ""),
        ({"enum": ['say "hi"']}, "enum", ""),
        ({"const": "back\\slash"}, "const", ""),
        ({"type": ["string", "null"], "items": {}}, "items", ""),
        ({"type": "string", "items": {}}, "items", ""),
        ({"properties": {}, "items": {}}, "items", ""),
        ({"type": "uuid"}, "type", ""),
        (obj(a={"type": "string", "nullable": True}), "nullable", "properties.a"),
        ({"type": "object", "required": ["a"]}, "required", ""),
        ({"properties": {'a"b': {}}}, "properties", ""),
        ({"type": "string", "maxLength": 1001}, "maxLength", ""),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems", ""),
        ({"prefixItems": [{}], "items": {"type": "string"}}, "items", ""),
        (
            obj(**{f"p{i}": {"type": "string", "maxLength": 1000} for i in range(21)}),
            "maxLength",
            "properties.p20",
        ),
        (DEEP, "items", ".".join(["items"] * 65)),
        ({"properties": {"a": False}}, "properties", "properties.a"),
        ({"foo": 1}, "foo", ""),
        (obj(a={"$id": "https://x/a.json", "type": "string"}), "$id", "properties.a"),
        # Keywords whose values have the wrong JSON type (these were 500s).
        ({"type": "object", "properties": {"a": {}}, "required": [1]}, "required", ""),
        ({"type": "object", "properties": {"a": {}}, "required": [{}]}, "required", ""),
        ({"type": "object", "properties": {"a": {}}, "required": "a"}, "required", ""),
        ({"enum": ["a"], "type": 5}, "type", ""),
        ({"enum": ["a"], "type": {"x": 1}}, "type", ""),
        ({"const": 1, "type": [[]]}, "type", ""),
        ({"type": [{"a": 1}, "string"]}, "type", ""),
        ({"type": []}, "type", ""),
        ({"type": 7}, "type", ""),
        ({"enum": "abc"}, "enum", ""),
        ({"properties": []}, "properties", ""),
        ({"type": "string", "pattern": 5}, "pattern", ""),
        ({"type": "string", "format": ["date"]}, "format", ""),
        ({"type": "string", "maxLength": "3"}, "maxLength", ""),
        ({"type": "string", "minLength": 1.5}, "minLength", ""),
        ({"type": "array", "maxItems": True}, "maxItems", ""),
        ({"properties": {"a": {}}, "additionalProperties": 1}, "additionalProperties", ""),
        ({"anyOf": {"type": "string"}}, "anyOf", ""),
        ({"allOf": {"type": "string"}}, "allOf", ""),
        ({"$ref": 5}, "$ref", ""),
        ({"prefixItems": {}}, "prefixItems", ""),
        (obj(a=[1]), "properties", "properties.a"),
        # Patterns that match nothing.
        (
            {"type": "string", "pattern": r"^x[^\x00-\uffff\ud800\udc00-\udbff\udfff]$"},
            "pattern",
            "",
        ),
        ({"type": "string", "pattern": "^[^\u0000-\U0010ffff]+$"}, "pattern", ""),
        ({"type": "string", "pattern": "^[\ud800-\udfff]$"}, "pattern", ""),
        # Nested bounded repetition (a 60-byte schema that froze the server).
        ({"type": "string", "pattern": "^(a{0,1000}){0,1000}$"}, "pattern", ""),
    ],
)
def test_refusals(schema: dict[str, Any], keyword: str, path: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as caught:
        check_schema(schema)
    assert (caught.value.keyword, caught.value.path) == (keyword, path)
    assert f"'{keyword}'" in str(caught.value)
    with pytest.raises(UnsupportedSchemaError):
        json_schema_gbnf(schema)


@pytest.mark.parametrize(
    ("tools", "keyword", "path"),
    [
        ([], "tools", "tools"),
        (
            [weather_tool(), strict(item_tool("bad", {"type": "integer", "maximum": 3}))],
            "maximum",
            "tools[1].function.parameters.$defs.Item",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
            "type",
            "tools[0].function.parameters",
        ),
        ([weather_tool(), weather_tool()], "name", "tools[1].function"),
        ([{"type": "function", "function": {"name": 'a"b'}}], "name", "tools[0].function"),
        ([{"type": "retrieval"}], "type", "tools[0]"),
    ],
)
def test_tool_refusals(tools: list[dict[str, Any]], keyword: str, path: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as caught:
        tool_calls_gbnf(tools, QWEN, max_calls=3)
    assert (caught.value.keyword, caught.value.path) == (keyword, path)


def test_a_non_strict_tool_keeps_what_the_grammar_enforces(grammars: Grammars) -> None:
    """Claude Code's tool schemas carry minimum / exclusiveMinimum / propertyNames / format
    uri: a non-strict tool drops them and keeps its structure; a strict one is refused."""
    parameters = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "offset": {"type": "integer", "minimum": 0, "exclusiveMinimum": -1},
            "url": {"type": "string", "format": "uri"},
            "script": {"type": "string", "maxLength": 100_000},
            "tags": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
            "mode": {"enum": ["a", "b"], "description": "x"},
            "either": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "anyOf": [{"required": ["a"]}],
            },
        },
        "required": ["offset", "url", "mode"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "read", "parameters": parameters}}
    gbnf = tool_calls_gbnf([tool], QWEN, max_calls=1)
    call = '<tool_call>\n{"name": "read", "arguments": %s}\n</tool_call>'
    assert grammars.accepts(gbnf, call % '{"offset": -5, "url": "x", "mode": "a"}')
    assert not grammars.accepts(gbnf, call % '{"offset": "5", "url": "x", "mode": "a"}')
    assert not grammars.accepts(gbnf, call % '{"offset": 5, "url": "x", "mode": "c"}')
    assert not grammars.accepts(gbnf, call % '{"url": "x", "mode": "a"}')
    with pytest.raises(UnsupportedSchemaError) as caught:
        tool_calls_gbnf([strict(tool)], QWEN, max_calls=1)
    assert caught.value.keyword == "minimum"


def test_error_message_is_client_safe() -> None:
    with pytest.raises(UnsupportedSchemaError) as caught:
        check_schema(obj(age={"type": "integer", "minimum": 0}))
    assert str(caught.value) == (
        "JSON schema keyword 'minimum' at 'properties.age' cannot be enforced."
    )
    assert isinstance(caught.value, ValueError)


def test_every_grammar_here_compiles(grammars: Grammars) -> None:
    schemas = [
        to_strict_json_schema(Person),
        to_strict_json_schema(Node),
        {"type": "array", "items": {"type": "string", "maxLength": 1000}, "maxItems": 1000},
        {"type": "string", "pattern": r"^([a-z]{0,11}){0,11}$"},
        {"type": "array", "items": {"type": "string", "minLength": 1000}, "minItems": 1000},
    ]
    for schema in schemas:
        assert grammars.compiles(json_schema_gbnf(schema))
    for syntax in (QWEN, GEMMA):
        for max_calls in (1, 8):
            for lead in ("", "</think>"):
                gbnf = tool_calls_gbnf(TOOLS, syntax, max_calls=max_calls, lead=lead)
                assert grammars.compiles(gbnf)
