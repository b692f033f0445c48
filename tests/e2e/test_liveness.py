"""``/health`` tells the truth about a stuck scheduler: 503 ``stalled`` with a reason while
a step runs past ``--max-step-time``, 200 again once it is done; ``/metrics`` shows step
times."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, model_entry

MAX_STEP_S = 0.05


@pytest.fixture(scope="module")
def strict(server_factory: Callable[..., RunningServer], bundled_gguf: Path) -> RunningServer:
    # n_batch 2048: a long prompt is decoded in one step of ~0.5 s, far past the bound.
    return server_factory(
        [model_entry("gemma-3-270m", bundled_gguf, n_ctx=4096, n_batch=2048, n_parallel=1)],
        env={"GGUFSERVE_MAX_STEP_S": str(MAX_STEP_S)},
    )


@pytest.fixture
def http(strict: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=strict.base_url, headers=strict.headers(), timeout=120) as c:
        yield c


def test_health_is_stalled_during_a_long_step_and_ok_after(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    seen: list[tuple[int, dict[str, object]]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            answer = http.get("/health")
            seen.append((answer.status_code, answer.json()))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        reply = http.post(
            "/v1/completions",
            json={"model": "gemma-3-270m", "prompt": "The sky is blue. " * 380, "max_tokens": 1},
        )
    finally:
        done.set()
        poller.join()
    assert reply.status_code == 200, reply.text
    stalled = [body for status, body in seen if status == 503]
    assert stalled, f"no 503 among {len(seen)} polls"
    assert stalled[0]["status"] == "stalled"
    assert "gemma-3-270m" in str(stalled[0]["reason"])
    assert "scheduler step" in str(stalled[0]["reason"])
    after = http.get("/health")
    assert after.status_code == 200 and after.json()["status"] == "ok"


def test_metrics_expose_step_times(http: httpx.Client) -> None:
    http.post(
        "/v1/completions", json={"model": "gemma-3-270m", "prompt": "Hi", "max_tokens": 2}
    ).raise_for_status()
    text = http.get("/metrics").text
    count = next(
        line for line in text.splitlines() if line.startswith("ggufserve_step_seconds_count")
    )
    assert float(count.rsplit(" ", 1)[1]) >= 2  # the prompt's steps and the token's
    assert "ggufserve_step_seconds_bucket{" in text
    assert 'ggufserve_step_age_seconds{model="gemma-3-270m"} 0.0' in text
