"""Nothing CPU-heavy on the event loop: while one pathological request is being prepared
(parsed, rendered, tokenized, its grammar converted), ``/health`` answers within 100 ms
every time it is polled (issue 24's bound)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningServer, model_entry

MODEL = "gemma-3-270m"
MAX_HEALTH_S = 0.1
POLL_EVERY_S = 0.02


@pytest.fixture(scope="module")
def busy(server_factory: Callable[..., RunningServer], bundled_gguf: Path) -> RunningServer:
    return server_factory(
        [model_entry(MODEL, bundled_gguf, embeddings=True)],
        env={"GGUFSERVE_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)},
    )


@pytest.fixture
def http(busy: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=busy.base_url, headers=busy.headers(), timeout=300) as client:
        yield client


def while_polling(
    server: RunningServer, send: Callable[[], httpx.Response]
) -> tuple[httpx.Response, list[float], float]:
    """Send a request while another connection polls ``/health`` every 20 ms; returns the
    response, each poll's latency (seconds) and how long the request took."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.base_url, timeout=30) as health:
            health.get("/health")  # connect first: only the answer's latency counts
            while not done.is_set():
                started = time.perf_counter()
                assert health.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(POLL_EVERY_S)

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.perf_counter()
    try:
        response = send()
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        poller.join()
    return response, latencies, elapsed


def chat(http: httpx.Client, **body: Any) -> Callable[[], httpx.Response]:
    return lambda: http.post("/v1/chat/completions", json={"model": MODEL, **body})


def assert_loop_free(latencies: list[float], elapsed: float, min_busy_s: float) -> None:
    # The request kept the server busy (or the check proves nothing), the loop stayed free.
    assert elapsed >= min_busy_s, f"the request took only {elapsed:.2f} s"
    assert len(latencies) >= elapsed / (POLL_EVERY_S + MAX_HEALTH_S) / 2
    assert max(latencies) <= MAX_HEALTH_S, f"/health took {max(latencies) * 1000:.0f} ms"


def test_many_messages_render_off_the_loop(busy: RunningServer, http: httpx.Client) -> None:
    # 15,000 one-letter turns (under the character cap and the JSON value bound): parsing
    # and rendering them takes about half a second.
    turns = [{"role": ("user", "assistant")[i % 2], "content": "a"} for i in range(15_000)]
    response, latencies, elapsed = while_polling(busy, chat(http, messages=turns, max_tokens=1))
    assert response.status_code == 400, response.text  # far beyond n_ctx once rendered
    assert response.json()["error"]["param"] == "messages"
    assert_loop_free(latencies, elapsed, min_busy_s=0.3)


def test_schema_conversion_off_the_loop(busy: RunningServer, http: httpx.Client) -> None:
    # Hundreds of optional properties: the JSON schema → GBNF conversion is the slow part.
    properties = {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(400)}
    schema = {"type": "object", "properties": properties}
    response_format = {"type": "json_schema", "json_schema": {"name": "wide", "schema": schema}}
    response, latencies, _ = while_polling(
        busy,
        chat(
            http,
            messages=[{"role": "user", "content": "Fill the form."}],
            response_format=response_format,
            max_tokens=1,
        ),
    )
    assert response.status_code in (200, 400), response.text
    assert max(latencies, default=0.0) <= MAX_HEALTH_S


def test_huge_embeddings_input_off_the_loop(busy: RunningServer, http: httpx.Client) -> None:
    # 60 inputs of ~15k characters: tokenized (about a second) before the token check fails.
    text = "hello world " * 1250
    response, latencies, elapsed = while_polling(
        busy, lambda: http.post("/v1/embeddings", json={"model": MODEL, "input": [text] * 60})
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "input"
    assert_loop_free(latencies, elapsed, min_busy_s=0.3)


def test_embeddings_character_caps(http: httpx.Client) -> None:
    # Under the per-request total (1,000,000, checked before the model is leased), over
    # the per-input cap (n_ctx x 32, checked on the model).
    one = http.post("/v1/embeddings", json={"model": MODEL, "input": "a" * 900_000})
    assert one.status_code == 400
    assert one.json()["error"]["param"] == "input"
    assert "characters per input" in one.json()["error"]["message"]
    total = http.post("/v1/embeddings", json={"model": MODEL, "input": ["b " * 5000] * 120})
    assert total.status_code == 400
    assert "are allowed per request" in total.json()["error"]["message"]


def test_multi_megabyte_bodies_off_the_loop(busy: RunningServer, http: httpx.Client) -> None:
    # One 6 MB message (refused by the prompt cap), then 6 MB of tiny objects (refused by
    # the JSON value bound before pydantic, which holds the GIL while it parses).
    big = chat(http, messages=[{"role": "user", "content": "x, " * 2_000_000}])
    response, latencies, _ = while_polling(busy, big)
    assert response.status_code in (400, 413), response.text
    assert max(latencies, default=0.0) <= MAX_HEALTH_S
    dense = chat(http, messages=[{"role": "user", "content": "hi"}] * 180_000)
    response, latencies, _ = while_polling(busy, dense)
    assert response.status_code == 413, response.text
    assert "JSON values" in response.json()["error"]["message"]
    assert max(latencies, default=0.0) <= MAX_HEALTH_S
