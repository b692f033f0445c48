"""Draft-model speculation through the real server (``speculative: {type: draft}`` in
models.yaml, the bundled Q4_K_M drafting for a Q8_0 of it), with the openai SDK: greedy
output and JSON-schema output are the same with ``speculative: false``, /metrics counts
the drafts, ``n`` = 2 works, and a stream closed early leaves the model serving."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.bench.copy_heavy import COPY_REQUEST
from tests.conftest import API_KEY, RunningServer, model_entry
from tests.e2e.test_speculation import spec_metrics
from tests.server.test_speculation_model import JSON_REQUEST, SCHEMA

MODEL = "gemma-3-270m-q8-drafted"
# The order has four items; past them the Q8_0 loops on the prompt's text, so the schema
# closes the list there (and the JSON then ends).
FOUR_ITEMS = {
    **SCHEMA,
    "properties": {
        **SCHEMA["properties"],
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
}


@pytest.fixture(scope="module")
def drafted(
    server_factory: Callable[..., RunningServer], q8_0_gguf: Path, bundled_gguf: Path
) -> RunningServer:
    speculative = {"type": "draft", "draft": str(bundled_gguf), "n_max": 16}
    return server_factory([model_entry(MODEL, q8_0_gguf, speculative=speculative)])


@pytest.fixture(scope="module")
def sdk(drafted: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=drafted.v1, api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


def rewrite(sdk: openai.OpenAI, **extra: object) -> list[str]:
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": COPY_REQUEST}],
        max_tokens=40,
        temperature=0,
        extra_body=extra or None,
    )
    return [choice.message.content or "" for choice in reply.choices]


def test_greedy_output_is_the_same_and_drafts_are_counted(
    sdk: openai.OpenAI, drafted: RunningServer
) -> None:
    start = spec_metrics(drafted, MODEL)
    (off,) = rewrite(sdk, speculative=False)
    assert spec_metrics(drafted, MODEL) == start
    (on,) = rewrite(sdk)
    drafted_n, accepted = (
        now - then for now, then in zip(spec_metrics(drafted, MODEL), start, strict=True)
    )
    assert 0 < accepted <= drafted_n
    assert on == off
    assert rewrite(sdk, n=2) == [off, off]


def test_json_schema_output_is_the_same_and_valid(sdk: openai.OpenAI) -> None:
    def order(speculative: bool) -> str:
        reply = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": JSON_REQUEST}],
            max_tokens=96,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "order", "schema": FOUR_ITEMS, "strict": True},
            },
            extra_body={"speculative": speculative},
        )
        return reply.choices[0].message.content or ""

    on = order(True)
    assert on == order(False)
    assert json.loads(on)["items"][3] == "linen tea towels"


def test_a_stream_closed_early_leaves_the_model_serving(sdk: openai.OpenAI) -> None:
    (whole,) = rewrite(sdk, speculative=False)
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": COPY_REQUEST}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) >= 5:
            break
    stream.close()
    assert whole.startswith("".join(pieces))
    assert rewrite(sdk) == [whole]
