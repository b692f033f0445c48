"""One structured request cannot monopolise the scheduler (issue 24, item 3): while the
most expensive grammar the limits accept is being generated, another client's stream keeps
its inter-token p95 close to what an ordinary request of the same length costs it (real
server, bundled Gemma 3); and a schema past the limits is a 400 naming the construct
before anything is generated.

On this project's 2-core machine a second sequence of any kind makes each step 1.8-2.1x
as long (two rows through the 262k-row output matrix), so the grammar's own cost is checked
against a plain companion request (within 25 %), with 3x solo as a hard ceiling."""

from __future__ import annotations

import itertools
import json
import statistics
import threading
import time
from typing import Any

import httpx

from tests.conftest import NO_EOG, RunningServer
from tests.e2e.conftest import MODEL

# Width 256 (255 values alive after '"item_' plus the closing bracket): the limit.
WIDEST_SCHEMA = {
    "type": "array",
    "items": {"enum": [f"item_{i:03d}" for i in range(255)]},
    "minItems": 300,  # keeps it generating through the whole measurement
    "maxItems": 1000,
}
STREAM_TOKENS = 100


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def inter_token_p95_s(server: RunningServer) -> float:
    """p95 of the gaps between a plain stream's content chunks (one token each)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": STREAM_TOKENS,
        "temperature": 0,
        "logit_bias": NO_EOG,
        "stream": True,
    }
    arrivals = []
    with (
        httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                "content"
            ):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) >= STREAM_TOKENS // 2
    return statistics.quantiles(gaps, n=20)[18]


class Background(threading.Thread):
    """Streams one structured request, recording its chunks until told to stop."""

    def __init__(self, server: RunningServer, response_format: dict[str, Any] | None):
        super().__init__(daemon=True)
        self.server = server
        self.response_format = response_format
        self.started = threading.Event()
        self.stop = threading.Event()
        self.status = 0
        self.chunks = 0
        self.errors: list[str] = []
        self.ended_at = float("inf")

    def run(self) -> None:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "List many items as a JSON array."}],
            "max_tokens": 1500,
            "temperature": 0,
            "stream": True,
        }
        if self.response_format is None:
            body["logit_bias"] = NO_EOG  # runs to max_tokens, like the structured one
        else:
            body["response_format"] = self.response_format
        headers = self.server.headers()
        with (
            httpx.Client(base_url=self.server.base_url, headers=headers, timeout=300) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith('data: {"error"'):
                    self.errors.append(line)
                elif line.startswith("data: {"):
                    self.chunks += 1
                    self.started.set()
                if self.stop.is_set():
                    break
        self.ended_at = time.monotonic()
        self.started.set()


def p95_beside(server: RunningServer, response_format: dict[str, Any] | None) -> float:
    """Best of two inter-token p95s of a plain stream while a long request runs beside it
    (``response_format`` None: an unconstrained one)."""
    background = Background(server, response_format)
    background.start()
    assert background.started.wait(120)
    p95_s = min(inter_token_p95_s(server) for _ in range(2))
    measured_until = time.monotonic()
    background.stop.set()
    background.join(120)
    assert background.status == 200 and not background.errors, background.errors
    assert background.ended_at > measured_until, "the background request ended too early"
    return p95_s


def test_widest_grammar_does_not_stall_other_streams(server: RunningServer) -> None:
    inter_token_p95_s(server)  # warm-up: first-request costs stay out of the solo figure
    # Best of two runs each, alike: the shared 2-core box has bursts of other load.
    solo_s = min(inter_token_p95_s(server) for _ in range(2))
    plain_s = p95_beside(server, None)
    grammar_s = p95_beside(server, schema_format(WIDEST_SCHEMA))
    print(
        f"inter-token p95: solo {solo_s * 1000:.1f} ms, beside a plain request "
        f"{plain_s * 1000:.1f} ms, beside the grammar {grammar_s * 1000:.1f} ms"
    )
    # The grammar's own share: within 25 % of what any second sequence costs.
    assert grammar_s <= 1.25 * plain_s, f"{grammar_s * 1000:.1f} ms vs {plain_s * 1000:.1f} ms"
    # A ceiling against any monopolising step (the old freeze was seconds per token).
    assert grammar_s <= 3 * solo_s, f"solo {solo_s * 1000:.1f} ms"


def test_schema_past_the_limits_is_a_400(server: RunningServer) -> None:
    schemas = [
        {"type": "string", "pattern": "^(a{0,1000}){0,1000}$"},
        {"enum": [f"v{i}" for i in range(8000)]},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(500)}},
        {"type": "object", "properties": {"a": {}}, "required": [1, {}]},
        {"enum": ["a"], "type": 5},
        {"type": "string", "pattern": "^[^\\u0000-\\U0010ffff]+$"},
    ]
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=60) as http:
        for schema in schemas:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": schema_format(schema),
                "max_tokens": 5,
            }
            start = time.monotonic()
            response = http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, (schema, response.text)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert "JSON schema keyword" in error["message"]
            assert time.monotonic() - start < 5
