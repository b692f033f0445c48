"""A request that fails a check needing no model (a refused field, tools that do not fit
together, a template variable the server sets, inputs over a cap) is refused before its
model is leased: for a model that is not loaded, the 400 comes at once and nothing loads.
Real server, real llama.cpp, the bundled Gemma 3 270M under several ids."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer
from tests.e2e.test_errors import assert_envelope
from tests.e2e.test_model_lifecycle import HI, cards, entry, serve
from tests.e2e.test_tools import TIME, WEATHER

pytestmark = pytest.mark.e2e

MAX_PROMPT_CHARS = 20000
# Long enough that a request waiting for its model's load would time out this test's client.
LOAD_TIMEOUT_S = 600
CLIENT_TIMEOUT_S = 60

CHAT_CASES: list[tuple[str, dict[str, Any], str]] = [
    (
        "tool_choice names an undeclared tool",
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ("tool_choice required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("duplicate tool names", {"tools": [WEATHER, WEATHER]}, "tools"),
    (
        "tools with a JSON response_format",
        {"tools": [WEATHER, TIME], "response_format": {"type": "json_object"}},
        "response_format",
    ),
    ("legacy functions", {"functions": [{"name": "f"}]}, "functions"),
    ("a chat template in the request", {"chat_template": "{{ messages }}"}, "chat_template"),
    ("store", {"store": True}, "store"),
    ("audio output", {"modalities": ["text", "audio"]}, "modalities"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, "top_logprobs"),
    (
        "a response_format schema keyword the grammar cannot enforce",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": 1}},
            }
        },
        "response_format.json_schema.schema",
    ),
    (
        "a tool parameters schema the grammar cannot enforce",
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "strict": True,  # a non-strict tool leaves out what is unenforceable
                        "parameters": {"type": "object", "not": {"required": ["x"]}},
                    },
                }
            ]
        },
        "tools",
    ),
    (
        "a template variable the server sets",
        {"chat_template_kwargs": {"add_generation_prompt": False}},
        "chat_template_kwargs",
    ),
]
COMPLETION_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("suffix", {"prompt": "def f(", "suffix": "return 1"}, "suffix"),
    ("best_of", {"prompt": "Hi", "best_of": 2}, "best_of"),
    ("prompt over the character cap", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
]
EMBEDDING_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("no inputs", {"input": []}, "input"),
    ("an empty text", {"input": ["a", ""]}, "input"),
    ("an empty token list", {"input": [[1, 2], []]}, "input"),
]


@pytest.fixture(scope="module")
def idle_server(
    server_factory: Callable[..., RunningServer],
    bundled_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    """``start`` loads at start-up; ``idle`` and ``idle-embed`` (embeddings) only on
    demand, and a request would wait up to ``LOAD_TIMEOUT_S`` for their load."""
    entries = [
        entry("start", bundled_gguf),
        entry("idle", bundled_gguf),
        entry("idle-embed", bundled_gguf, embeddings=True),
    ]
    env = {
        "GGUFSERVE_LOAD_TIMEOUT_S": str(LOAD_TIMEOUT_S),
        "GGUFSERVE_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
    }
    return serve(server_factory, tmp_path_factory.mktemp("idle"), entries, ["start"], env)


def loads(server: RunningServer) -> float:
    """The server's model-load counter (``/metrics``)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=CLIENT_TIMEOUT_S).text
    line = next(line for line in text.splitlines() if line.startswith("ggufserve_model_loads_"))
    return float(line.split()[-1])


def refused(server: RunningServer, path: str, body: dict[str, Any], param: str) -> None:
    response = httpx.post(f"{server.v1}/{path}", json=body, timeout=CLIENT_TIMEOUT_S)
    error = assert_envelope(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


def assert_still_idle(server: RunningServer, loads_before: float) -> None:
    states = cards(server)
    assert states["idle"]["state"] == "available" and states["idle"]["memory_bytes"] is None
    assert states["idle-embed"]["state"] == "available"
    assert loads(server) == loads_before


@pytest.mark.parametrize(("case", "extra", "param"), CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_refused_without_loading(
    idle_server: RunningServer, case: str, extra: dict[str, Any], param: str
) -> None:
    before = loads(idle_server)
    body = {"model": "idle", "messages": HI, "max_tokens": 2, **extra}
    refused(idle_server, "chat/completions", body, param)
    refused(idle_server, "chat/completions", {**body, "stream": True}, param)
    assert_still_idle(idle_server, before)


@pytest.mark.parametrize(
    ("case", "extra", "param"), COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES]
)
def test_completion_refused_without_loading(
    idle_server: RunningServer, case: str, extra: dict[str, Any], param: str
) -> None:
    before = loads(idle_server)
    refused(idle_server, "completions", {"model": "idle", "max_tokens": 2, **extra}, param)
    assert_still_idle(idle_server, before)


@pytest.mark.parametrize(
    ("case", "extra", "param"), EMBEDDING_CASES, ids=[c[0] for c in EMBEDDING_CASES]
)
def test_embedding_refused_without_loading(
    idle_server: RunningServer, case: str, extra: dict[str, Any], param: str
) -> None:
    before = loads(idle_server)
    refused(idle_server, "embeddings", {"model": "idle-embed", **extra}, param)
    assert_still_idle(idle_server, before)


def test_unknown_model_is_still_a_404_first(idle_server: RunningServer) -> None:
    body = {"model": "nope", "messages": HI, "store": True}
    response = httpx.post(f"{idle_server.v1}/chat/completions", json=body, timeout=30)
    assert_envelope(response, 404, code="model_not_found")


def test_a_valid_request_then_loads_the_model(idle_server: RunningServer) -> None:
    """The control: the same server loads ``idle`` for a request that passes the checks
    (so the refusals above were not merely too early to see a load)."""
    before = loads(idle_server)
    body = {"model": "idle", "messages": HI, "max_tokens": 1, "tools": [WEATHER, TIME]}
    response = httpx.post(f"{idle_server.v1}/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert cards(idle_server)["idle"]["state"] == "ready"
    assert loads(idle_server) == before + 1
