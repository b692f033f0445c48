"""Inputs that used to raise inside the server (HTTP 500) get a 400 naming the field.

Each class from issue 24 with more variants than it listed: Unicode digits that
``str.isdigit()`` accepts and ``int()`` refuses (or reads as another number), integers too
large for a float or for Python's 4300-digit int-string limit, non-finite numbers, Go
durations in other scripts, and assistant history whose ``tool_calls[].function.arguments``
nests deeper than the parser's recursion allows.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ggufserve.api.wire import MAX_TOOL_ARGUMENTS_DEPTH, json_nesting_exceeds, keep_alive_seconds
from tests.e2e.conftest import MODEL
from tests.e2e.test_errors import assert_envelope

OK_MESSAGES = [{"role": "user", "content": "Hi"}]
CHAT = {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 1}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
EMBEDDING = {"model": MODEL, "input": "Hi"}
ENDPOINTS = {"chat": ("/v1/chat/completions", CHAT), "completions": ("/v1/completions", COMPLETION)}
ARGUMENTS_PARAM = "messages.1.assistant.tool_calls.{index}.function.arguments"


@pytest.fixture(autouse=True)
def server_still_answers(http: httpx.Client) -> Any:
    yield
    assert http.get("/health", timeout=5).status_code == 200
    after = http.post("/v1/chat/completions", json=CHAT)
    assert after.status_code == 200, after.text


def post_raw(http: httpx.Client, path: str, raw: str) -> httpx.Response:
    """POST a body written by hand (numbers JSON allows but Python's json cannot emit)."""
    return http.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def with_field(body: dict[str, Any], field: str, literal: str) -> str:
    """``body`` as JSON with ``field`` set to a raw JSON literal."""
    rest = {key: value for key, value in body.items() if key != field}
    return json.dumps(rest)[:-1] + f', "{field}": {literal}}}'


# ---- logit_bias keys ---------------------------------------------------------------------

BAD_TOKEN_KEYS = {
    "superscript-two": "²",
    "superscript-five": "⁵",
    "circled-one": "①",
    "arabic-indic-three": "٣",  # int() reads 3: refused rather than guessed
    "fullwidth-five": "５",
    "math-bold-five": "𝟓",
    "eleven-digits": "1" * 11,
    "thousand-digits": "7" * 1000,
    "over-int-str-limit": "9" * 4301,
    "negative": "-1",
    "plus": "+5",
    "leading-space": " 5",
    "trailing-newline": "5\n",
    "empty": "",
    "hex": "0x1f",
    "exponent": "1e3",
    "decimal": "1.0",
    "underscore": "1_000",
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("key", list(BAD_TOKEN_KEYS.values()), ids=list(BAD_TOKEN_KEYS))
def test_logit_bias_key_not_ascii_token_id(http: httpx.Client, endpoint: str, key: str) -> None:
    path, body = ENDPOINTS[endpoint]
    response = http.post(path, json={**body, "logit_bias": {key: 1}})
    error = assert_envelope(response, 400, param="logit_bias")
    assert error["type"] == "invalid_request_error"
    assert key not in error["message"] or not key.strip()


def test_logit_bias_ten_digit_id_is_a_vocabulary_error(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"9999999999": 1}})
    assert "vocabulary" in assert_envelope(response, 400, param="logit_bias")["message"]


def test_logit_bias_leading_zeros_still_work(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"0000000001": -5}})
    assert response.status_code == 200, response.text


# ---- keep_alive ----------------------------------------------------------------------------

BAD_KEEP_ALIVE_LITERALS = {
    "int-over-float": str(10**400),
    "negative-int-over-float": str(-(10**400)),
    "int-just-over-float": str(2**1024),
    "float-overflow-literal": "1e309",
    "nan-literal": "NaN",
    "infinity-literal": "Infinity",
    "arabic-indic-minutes": json.dumps("٣m"),
    "fullwidth-minutes": json.dumps("５m"),
    "devanagari-seconds": json.dumps("५"),
    "over-64-chars": json.dumps("1h" * 33),
    "megabyte-string": json.dumps("1h" * 200_000),
    "digits-overflow-float": json.dumps("9" * 400),
    "exponent-string": json.dumps("1e309"),
    "nan-string": json.dumps("nan"),
    "inf-string": json.dumps("inf"),
    "bare-sign": json.dumps("-"),
    "unit-only": json.dumps("m"),
    "days": json.dumps("5d"),
    "boolean": "true",
    "list": "[5]",
    "object": '{"s": 1}',
}


@pytest.mark.parametrize(
    "literal", list(BAD_KEEP_ALIVE_LITERALS.values()), ids=list(BAD_KEEP_ALIVE_LITERALS)
)
@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_keep_alive_out_of_range_or_malformed(
    http: httpx.Client, endpoint: str, literal: str
) -> None:
    body = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}.get(endpoint, EMBEDDING)
    response = post_raw(http, endpoint, with_field(body, "keep_alive", literal))
    assert_envelope(response, 400, param="keep_alive")


@pytest.mark.parametrize("value", [10**300, 1e308, -1, -(10**300), 86400.5, "1h30m", "-1m"])
def test_keep_alive_edges_that_are_valid(http: httpx.Client, value: object) -> None:
    # Long or forever only: the next request (without keep_alive) restores the default.
    response = http.post("/v1/completions", json={**COMPLETION, "keep_alive": value})
    assert response.status_code == 200, response.text


# ---- numbers at the edges ----------------------------------------------------------------

BIG = str(10**400)
OVER_INT_STR_LIMIT = "9" * 4301


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("top_k", str(2**31)),
        ("top_k", str(2**40)),
        ("top_k", BIG),
        ("n", BIG),
        ("seed", BIG),
        ("seed", "-" + BIG),
        ("top_logprobs", BIG),
        ("temperature", BIG),
        ("temperature", "1e309"),
        ("temperature", "-1e309"),
        ("top_p", "NaN"),
        ("min_p", "Infinity"),
        ("presence_penalty", BIG),
        ("frequency_penalty", "-" + BIG),
        ("repeat_penalty", "1e309"),
        ("max_tokens", "1e309"),
        ("max_completion_tokens", "1e400"),
        ("logit_bias", '{"5": ' + BIG + "}"),
        ("logit_bias", '{"5": NaN}'),
    ],
)
def test_numbers_beyond_range_name_the_field(http: httpx.Client, field: str, literal: str) -> None:
    response = post_raw(http, "/v1/chat/completions", with_field(CHAT, field, literal))
    error = assert_envelope(response, 400)
    assert error["param"] is not None and error["param"].startswith(field), error


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_astronomical_max_tokens_is_context_length(http: httpx.Client, field: str) -> None:
    response = post_raw(http, "/v1/chat/completions", with_field(CHAT, field, BIG))
    assert_envelope(response, 400, code="context_length_exceeded")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/chat/completions", CHAT, "max_tokens"),
        ("/v1/chat/completions", CHAT, "temperature"),
        ("/v1/completions", COMPLETION, "seed"),
        ("/v1/embeddings", EMBEDDING, "dimensions"),
    ],
)
def test_number_over_int_string_limit_is_invalid_json(
    http: httpx.Client, path: str, body: dict[str, Any], field: str
) -> None:
    # JSON numbers of more than 4300 digits stop the parser (Python's int-string limit).
    assert_envelope(post_raw(http, path, with_field(body, field, OVER_INT_STR_LIMIT)), 400)


@pytest.mark.parametrize("prompt", [[10**30], [2**63], [[5, 2**31]], [[10**400]]])
def test_huge_token_ids_in_prompt(http: httpx.Client, prompt: list[Any]) -> None:
    response = http.post("/v1/completions", json={**COMPLETION, "prompt": prompt})
    assert_envelope(response, 400, param="prompt")


# ---- tool call arguments nested too deep -------------------------------------------------


def history(*arguments: str) -> list[dict[str, Any]]:
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": text}}
        for i, text in enumerate(arguments)
    ]
    results = [
        {"role": "tool", "tool_call_id": f"c{i}", "content": "ok"} for i in range(len(arguments))
    ]
    return [OK_MESSAGES[0], {"role": "assistant", "tool_calls": calls}, *results]


LIMIT = MAX_TOOL_ARGUMENTS_DEPTH
TOO_DEEP = {
    "arrays-65": "[" * (LIMIT + 1) + "]" * (LIMIT + 1),
    "arrays-5000": "[" * 5000 + "]" * 5000,
    "objects-5000": '{"a":' * 5000 + "1" + "}" * 5000,
    "unclosed-20000": "[" * 20_000,
    "mixed-unclosed": '[{"a":' * 3000,
    "after-a-string": '["]]]", ' + "[" * 2000,
    "after-escaped-quote": '["\\"]", ' + "[" * 2000,
    "after-escaped-backslash": '["\\\\", ' + "[" * 2000,
    "deep-in-valid-sibling": '{"ok": [1, 2], "deep": ' + "[" * 200 + "]" * 200 + "}",
    "invalid-prefix": "not json " + "[" * 5000,
}


@pytest.mark.parametrize("arguments", list(TOO_DEEP.values()), ids=list(TOO_DEEP))
def test_tool_arguments_nested_too_deep(http: httpx.Client, arguments: str) -> None:
    body = {**CHAT, "messages": history(arguments)}
    response = http.post("/v1/chat/completions", json=body)
    error = assert_envelope(response, 400, param=ARGUMENTS_PARAM.format(index=0))
    assert str(LIMIT) in error["message"]


def test_second_tool_call_is_named(http: httpx.Client) -> None:
    body = {**CHAT, "messages": history('{"a": 1}', "[" * 3000)}
    response = http.post("/v1/chat/completions", json=body)
    assert_envelope(response, 400, param=ARGUMENTS_PARAM.format(index=1))


SHALLOW_ENOUGH = {
    "exactly-the-limit": "[" * LIMIT + "]" * LIMIT,
    "brackets-inside-a-string": json.dumps({"code": "[" * 5000}),
    "escaped-quotes-and-brackets": json.dumps({"s": '\\"[[[' * 200}),
    "many-siblings": json.dumps([[1]] * 300),
    "not-json": "plain text (with brackets]",
}


@pytest.mark.parametrize("arguments", list(SHALLOW_ENOUGH.values()), ids=list(SHALLOW_ENOUGH))
def test_tool_arguments_within_the_limit_are_accepted(http: httpx.Client, arguments: str) -> None:
    body = {**CHAT, "messages": history(arguments)}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


# ---- the depth scan against the parser itself (no server) --------------------------------


def parser_depth(value: Any) -> int:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return 1 + max((parser_depth(item) for item in value), default=0)
    return 0


@pytest.mark.parametrize(
    "text",
    [
        '["a\\"[[[", "\\\\", [["\\\\\\"]"]]]',
        '{"a": [1, {"b": "]]]"}]}',
        '[["\\\\\\\\"], {"x": ["[\\"["]}]',
        '"[[["',
        "[]",
        '{"k": "\\u005b"}',
        "1",
        json.dumps([{"é": ["ü", {"😀": [[["[{"]]]}]}]),
    ],
)
def test_depth_scan_matches_the_parser(text: str) -> None:
    depth = parser_depth(json.loads(text))
    for max_depth in range(depth + 2):
        assert json_nesting_exceeds(text, max_depth) == (depth > max_depth), max_depth


def test_depth_scan_spans_chunks() -> None:
    # The opening run straddles the scanner's 1 MiB chunks; a string hides half of it.
    text = '"' + "x" * (1 << 20) + '"' + "[" * (LIMIT + 1)
    assert json_nesting_exceeds(text, LIMIT)
    assert not json_nesting_exceeds('"' + "[" * (2 << 20) + '"', LIMIT)


@pytest.mark.parametrize("value", [10**400, -(10**400), "٣m", "1h" * 33, "9" * 400])
def test_keep_alive_parser_raises_value_error(value: object) -> None:
    with pytest.raises(ValueError):
        keep_alive_seconds(value)
