"""Grammar cost bounds: the limits of ggufserve.grammar.cost refuse what would stall the
scheduler (with the construct and its path), every real-world schema stays accepted, no
schema raises anything but UnsupportedSchemaError (fuzzed), and the sampler ends a
sequence whose grammar dead-ends or runs too long (real llama.cpp, bundled Gemma 3)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from ggufserve.engine.base import Failed, GenerationRequest, GrammarSpec, SamplingParams, TextDelta
from ggufserve.engine.llama import LlamaEngine
from ggufserve.engine.sampling import GrammarDeadEnd, GrammarTooExpensive, TokenSampler
from ggufserve.errors import InvalidRequestError
from ggufserve.generation.streaming import failure
from ggufserve.grammar import (
    UnsupportedSchemaError,
    check_schema,
    json_schema_gbnf,
    tool_calls_gbnf,
)
from ggufserve.grammar.cost import DEFAULT_LIMITS
from tests.server.test_grammar import QWEN

# Well under the 10-20 s stalls these inputs caused; every pass is linear now.
QUICK_S = 1.0


def optional_object(n: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}


def ref_chain(n: int) -> dict[str, Any]:
    defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def enum_tool(name: str, n: int) -> dict[str, Any]:
    values = [f"{name}_{i}" for i in range(n)]
    return tool(name, {"type": "object", "properties": {"v": {"enum": values}}, "required": ["v"]})


@pytest.mark.parametrize(
    ("schema", "keyword", "path", "words"),
    [
        ({"enum": [f"v{i}" for i in range(257)]}, "enum", "", "257 values"),
        (
            {"properties": {"a": {"enum": list(range(8000))}}},
            "enum",
            "properties.a",
            "8000 values",
        ),
        (optional_object(129), "properties", "", "129 optional properties"),
        (
            {"properties": {"x": {"type": "string", "pattern": "^(a{0,12}){0,12}$"}}},
            "pattern",
            "properties.x",
            "144 parse alternatives",
        ),
        ({"type": "string", "pattern": "^(a?a?a?a?a?a?a?a?a?a?){20}$"}, "pattern", "", "200"),
        ({"type": "string", "pattern": "^(a*){200}$"}, "pattern", "", "200"),
        ({"anyOf": [{"const": i} for i in range(300)]}, "anyOf", "", "too wide"),
        (
            {"type": "array", "items": {"anyOf": [{"enum": list(range(200))}] * 2}},
            "anyOf",
            "items",
            "about 400",
        ),
        ({"enum": ["x" * 1000] * 70}, "enum", "", "65536 characters"),
        (
            {"type": "object", "properties": {f"p{i}": {} for i in range(5000)}},
            "schema",
            "properties.p4095",
            "4096 nodes",
        ),
        (ref_chain(200), "$ref", "$defs.d64", "through '$ref'"),
    ],
)
def test_cost_limits(schema: dict[str, Any], keyword: str, path: str, words: str) -> None:
    start = time.monotonic()
    with pytest.raises(UnsupportedSchemaError) as caught:
        json_schema_gbnf(schema)
    assert time.monotonic() - start < QUICK_S
    assert (caught.value.keyword, caught.value.path) == (keyword, path), str(caught.value)
    assert words in str(caught.value)


def test_all_tools_together_are_bounded() -> None:
    tool_calls_gbnf([enum_tool("a", 200)], QWEN)  # one is fine
    with pytest.raises(UnsupportedSchemaError) as caught:
        tool_calls_gbnf([enum_tool("a", 200), enum_tool("b", 200)], QWEN)
    assert (caught.value.keyword, caught.value.path) == ("tools", "tools")


def test_limits_are_documented_defaults() -> None:
    assert DEFAULT_LIMITS.max_width == 256
    assert DEFAULT_LIMITS.max_enum_values == 256
    assert DEFAULT_LIMITS.max_optional_properties == 128


@pytest.mark.parametrize(
    "schema",
    [
        # $ref chains and cycles that took the old quadratic cycle check seconds.
        {
            "$ref": "#/$defs/d0",
            "$defs": {f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}]} for i in range(3000)}
            | {"d3000": {"$ref": "#/$defs/d0"}},
        },
        {
            "$ref": "#/$defs/d0",
            "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)},
        },
        optional_object(5000),
        {"properties": {"a": {}}, "required": ["a"] * 200_000},
        {"enum": [["x" * 100] * 100] * 200},
    ],
)
def test_huge_inputs_are_refused_quickly(schema: dict[str, Any]) -> None:
    start = time.monotonic()
    with contextlib.suppress(UnsupportedSchemaError):
        json_schema_gbnf(schema)
    assert time.monotonic() - start < QUICK_S


def test_deep_const_is_a_refusal_not_a_recursion_error() -> None:
    value: Any = 1
    for _ in range(50_000):
        value = [value]
    with pytest.raises(UnsupportedSchemaError) as caught:
        check_schema({"const": value})
    assert caught.value.keyword == "const"


# ---- real-world schemas stay accepted ---------------------------------------------------

REAL_PATTERNS = [
    r"^\d{4}-\d{2}-\d{2}$",  # ISO date
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",  # ISO date-time
    r"^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$",  # IPv4
    r"^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+\.[a-zA-Z]{2,}$",  # e-mail
    r"^[^@\s]+@[^@\s]+\.[^@\s]+$",  # e-mail, loose
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",  # UUID
    r"^\+[1-9]\d{1,14}$",  # E.164 phone
    r"^\(?\d{3}\)?[-. ]?\d{3}[-. ]?\d{4}$",  # US phone
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)"
    r"(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    r"^#[0-9a-fA-F]{6}$",
    r"^[a-z0-9]+(?:-[a-z0-9]+)*$",  # slug
    r"^https?://[^\s/$.?#].[^\s]*$",
    r"^[A-Z]{2}\d{2}[A-Z0-9]{1,30}$",  # IBAN
    r"^[a-z]{0,1000}$",
]


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Line(BaseModel):
    sku: str
    quantity: int
    note: str | None


class Order(BaseModel):
    id: str
    status: Literal["new", "paid", "shipped"]
    colour: Colour
    lines: list[Line]
    billing: Line | None
    tags: list[str]


@pytest.fixture(scope="module")
def vocab(bundled_gguf: Path) -> Iterator[Any]:
    llm = llama_cpp.Llama(str(bundled_gguf), vocab_only=True, verbose=False)
    yield llama_cpp.llama_model_get_vocab(llm.model)
    llm.close()


def compiles(vocab: Any, gbnf: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


REAL_SCHEMAS = [
    *({"type": "string", "pattern": p} for p in REAL_PATTERNS),
    to_strict_json_schema(Order),
    {"enum": [f"{a}{b}" for a in "ABCDEFGHIJ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXY"][:249]},
    optional_object(100),
    {"type": "array", "items": {"type": "string", "maxLength": 1000}, "maxItems": 1000},
]


@pytest.mark.parametrize("schema", REAL_SCHEMAS)
def test_real_world_schemas_are_accepted(vocab: Any, schema: dict[str, Any]) -> None:
    assert compiles(vocab, json_schema_gbnf(schema))


def test_twenty_ordinary_tools_are_accepted(vocab: Any) -> None:
    tools = [tool(f"t{i}", to_strict_json_schema(Line)) for i in range(20)]
    assert compiles(vocab, tool_calls_gbnf(tools, QWEN, max_calls=8))


def test_grammar_builds_share_no_state() -> None:
    schemas = [to_strict_json_schema(Order), *REAL_SCHEMAS[:8]] * 4
    alone = [json_schema_gbnf(s) for s in schemas]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(json_schema_gbnf, schemas)) == alone


# ---- fuzz: wrong JSON types anywhere are refusals, never other exceptions ---------------

KEYWORDS = [
    "type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf",
    "oneOf", "allOf", "$ref", "$defs", "pattern", "format", "minLength", "maxLength",
    "minItems", "maxItems", "additionalProperties", "title",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["string", "object", "array", "integer", "null", "#/$defs/a", "#", "a"]),
    st.sampled_from(["^a{2}$", "[^\\x00-\\uffff]", "(a{0,99}){0,99}", "date", "\\", "(?=x)"]),
    st.text(max_size=5),
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYWORDS) | st.text(max_size=3), inner, max_size=5),
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(JSONISH)
def test_fuzzed_schemas_only_ever_raise_unsupported(schema: Any) -> None:
    for build in (
        lambda: json_schema_gbnf(schema),
        lambda: tool_calls_gbnf([tool("f", schema)], QWEN),
        lambda: tool_calls_gbnf([{"type": "function", "function": schema}], QWEN),
    ):
        with contextlib.suppress(UnsupportedSchemaError):
            build()


# ---- the sampler ends a sequence its grammar cannot serve --------------------------------

GREEDY = SamplingParams(0.0, 1.0, 0, 0.0, 0.0, 0.0, 1.0, seed=1)


@pytest.fixture(scope="module")
def llm(bundled_gguf: Path) -> Iterator[llama_cpp.Llama]:
    model = llama_cpp.Llama(str(bundled_gguf), n_ctx=128, n_threads=2, verbose=False)
    model.eval(model.tokenize(b"The capital of France is"))
    yield model
    model.close()


def sampler(llm: llama_cpp.Llama, gbnf: str, **kwargs: Any) -> TokenSampler:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return TokenSampler(GREEDY, vocab, llm.n_vocab(), GrammarSpec(gbnf), **kwargs)


def test_dead_end_fails_instead_of_going_free(llm: llama_cpp.Llama) -> None:
    # After "a" only a code point past any UTF-8 sequence fits: no token can follow.
    chosen = sampler(llm, 'root ::= "a" [\\U00400000]')
    assert llm.detokenize([chosen.sample(llm._ctx, -1)]) == b"a"
    with pytest.raises(GrammarDeadEnd):
        chosen.sample(llm._ctx, -1)
    chosen.close()


def test_slow_grammar_step_fails(llm: llama_cpp.Llama) -> None:
    ok = sampler(llm, 'root ::= "Paris" | "Lyon"')
    assert llm.detokenize([ok.sample(llm._ctx, -1)]) in (b"Paris", b"Lyon", b"P", b"L")
    ok.close()
    slow = sampler(llm, 'root ::= "Paris" | "Lyon"', max_grammar_step_s=0.0)
    with pytest.raises(GrammarTooExpensive):
        slow.sample(llm._ctx, -1)
    slow.close()


def test_failed_grammar_is_a_400() -> None:
    for code in ("grammar_dead_end", "grammar_too_expensive"):
        error = failure(Failed(code=code), "req-1")
        assert isinstance(error, InvalidRequestError)
        assert error.envelope()["error"]["code"] == code


def test_engine_fails_only_the_dead_end_sequence(bundled_gguf: Path) -> None:
    engine = LlamaEngine(
        bundled_gguf,
        n_ctx=512,
        n_parallel=2,
        n_gpu_layers=0,
        n_threads=2,
        n_batch=128,
        max_queued=4,
    )

    async def run() -> list[list[Any]]:
        prompt = engine.tokenize("<bos>Say something.")
        dead = GenerationRequest(
            prompt, 8, GREEDY, grammar=GrammarSpec('root ::= "a" [\\U00400000]')
        )
        free = GenerationRequest(prompt, 8, GREEDY)
        generations = [engine.submit(dead), engine.submit(free)]

        async def events(generation: Any) -> list[Any]:
            return [event async for event in generation.events()]

        return list(await asyncio.gather(*(events(g) for g in generations)))

    try:
        dead_events, free_events = asyncio.run(run())
    finally:
        engine.close()
    assert dead_events[-1] == Failed(code="grammar_dead_end")
    assert "".join(e.text for e in dead_events if isinstance(e, TextDelta)) == "a"
    assert not any(isinstance(e, Failed) for e in free_events)
    assert sum(1 for e in free_events if isinstance(e, TextDelta)) > 0


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "a{" + "9" * 5000 + "}"},
        {"type": "string", "pattern": "a{1," + "9" * 5000 + "}"},
        {"type": "string", "pattern": "a{" + "9" * 12 + "}"},
        {"$defs": {"a": [{"type": "string"}]}, "$ref": "#/$defs/a/²"},
        {"$defs": {"a": [{"type": "string"}]}, "$ref": "#/$defs/a/١"},
        {"$defs": {"a": [{"type": "string"}]}, "$ref": "#/$defs/a/" + "1" * 5000},
        {"$defs": {"a": [{"type": "string"}]}, "$ref": "#/$defs/a/01"},
    ],
    ids=[
        "huge-exact",
        "huge-upper",
        "12-digit",
        "superscript-index",
        "arabic-index",
        "5000-digit-index",
        "leading-zero",
    ],
)
def test_unicode_and_huge_numbers_are_refusals(schema: dict[str, Any]) -> None:
    # str.isdigit() accepts these and int() refuses or misreads them: a refusal, never a 500.
    with pytest.raises(UnsupportedSchemaError):
        check_schema(schema)


def test_non_ascii_digits_in_braces_are_literal_text() -> None:
    # ECMA-262 reads a{٣} as the text "a{٣}", not as three a's.
    gbnf = json_schema_gbnf({"type": "string", "pattern": "^a{٣}$"})
    assert '"a" [\\x7B] [\\u0663] [\\x7D]' in gbnf
