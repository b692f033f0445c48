"""Concurrency, queueing, cancellation and liveness of the real server."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import API_KEY, NO_EOG, RunningServer, model_entry
from tests.e2e.conftest import MODEL

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Count to one thousand."}]}


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    match = re.search(rf'^{name}_total{{model="{MODEL}"}} (\S+)$', text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_four_concurrent_streams_all_complete_in_full(server: RunningServer) -> None:
    client = openai.AsyncOpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=300)

    async def one(index: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Story number {index}:"}],
            max_tokens=48,
            temperature=0.7,
            seed=index,
            logit_bias=NO_EOG,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, completion_tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        return text, finish, completion_tokens

    async def run_all() -> list[tuple[str, str | None, int]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(4)))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert [r[1] for r in results] == ["length"] * 4
    assert [r[2] for r in results] == [48] * 4
    assert all(r[0] for r in results)


def test_disconnect_mid_stream_stops_generation(
    server: RunningServer, http: httpx.Client, client: openai.OpenAI
) -> None:
    generated_before = metric(http, "ggufserve_generated_tokens")
    cancelled_before = metric(http, "ggufserve_requests_cancelled")
    body = {**LONG, "max_tokens": 1500, "logit_bias": NO_EOG, "stream": True}
    with (
        httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=60) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(8):
            next(lines)
    # The connection is closed: the worker must notice within a few tokens.
    assert wait_for(
        lambda: metric(http, "ggufserve_requests_cancelled") == cancelled_before + 1, 10
    )
    at_cancel = metric(http, "ggufserve_generated_tokens")
    assert at_cancel - generated_before < 100  # far from the 1,500 asked for
    follow_up = client.chat.completions.create(
        model=MODEL, messages=LONG["messages"], max_tokens=3, logit_bias=NO_EOG
    )
    assert follow_up.usage is not None and follow_up.usage.completion_tokens == 3
    assert metric(http, "ggufserve_generated_tokens") == at_cancel + 3


def test_disconnect_of_non_stream_request_stops_generation(
    server: RunningServer, http: httpx.Client
) -> None:
    cancelled_before = metric(http, "ggufserve_requests_cancelled")
    generated_before = metric(http, "ggufserve_generated_tokens")
    body = {**LONG, "max_tokens": 1500, "logit_bias": NO_EOG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.v1}/chat/completions", json=body, headers=server.headers(), timeout=1.0
        )
    assert wait_for(
        lambda: metric(http, "ggufserve_requests_cancelled") == cancelled_before + 1, 10
    )
    assert metric(http, "ggufserve_generated_tokens") - generated_before < 1500


def test_health_answers_during_long_generation(server: RunningServer) -> None:
    body = {**LONG, "max_tokens": 400, "logit_bias": NO_EOG, "stream": True}
    with (
        httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=120) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        started = time.monotonic()
        health = httpx.get(f"{server.base_url}/health", timeout=5)
        health_s = time.monotonic() - started
        remaining = sum(1 for line in lines if line.startswith("data: {"))
    assert health.status_code == 200
    # The generation was still running when /health answered.
    assert remaining > 50, (remaining, health_s)


def test_full_queue_answers_429_and_running_request_completes(
    server_factory: Callable[..., RunningServer], bundled_gguf: Path
) -> None:
    # One sequence: the first request runs, the second waits, the third is refused.
    small = server_factory(
        [model_entry(MODEL, bundled_gguf, n_parallel=1)],
        env={"GGUFSERVE_MAX_QUEUED_REQUESTS": "1"},
    )
    body = {**LONG, "max_tokens": 200, "logit_bias": NO_EOG, "stream": True}
    quick = {**LONG, "max_tokens": 2}
    with (
        httpx.Client(base_url=small.base_url, headers=small.headers(), timeout=120) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as running,
    ):
        lines = running.iter_lines()
        next(lines)
        next(lines)
        with own.stream("POST", "/v1/chat/completions", json={**quick, "stream": True}):
            rejected = own.post("/v1/chat/completions", json=quick)
            assert rejected.status_code == 429
            assert int(rejected.headers["retry-after"]) >= 1
            assert rejected.json()["error"]["type"] == "rate_limit_error"
        chunks = [line for line in lines if line.startswith("data: {")]
    assert '"finish_reason":"length"' in chunks[-1]
    again = httpx.post(f"{small.v1}/chat/completions", json=quick, headers=small.headers())
    assert again.status_code == 200


def test_sigterm_lets_running_stream_finish_and_exits_cleanly(
    server_factory: Callable[..., RunningServer], bundled_gguf: Path
) -> None:
    running = server_factory([model_entry(MODEL, bundled_gguf)], api_key=None)
    body = {**LONG, "max_tokens": 60, "logit_bias": NO_EOG, "stream": True}
    with (
        httpx.Client(base_url=running.base_url, timeout=120) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(lines)
        running.process.send_signal(signal.SIGTERM)
        chunks = [line for line in lines if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in chunks[-2]
    assert running.process.wait(60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.base_url}/health", timeout=2)
