"""Models loaded on demand, unloaded after keep_alive, kept under a memory budget, and
served from a catalog (the model store's hook): real servers, real llama.cpp, the
bundled Gemma 3 270M under several ids."""

from __future__ import annotations

import functools
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from starlette.testclient import TestClient

from ggufserve.api.app import create_app
from ggufserve.models.memory import MiB, estimate_bytes
from ggufserve.models.registry import ModelRegistry
from ggufserve.settings import FileSource, ModelEntry, ServerSettings
from tests.conftest import NO_EOG, RunningServer, model_entry
from tests.e2e.test_errors import assert_envelope

pytestmark = pytest.mark.e2e

N_CTX = 1024
HI = [{"role": "user", "content": "Hi"}]


def entry(model_id: str, gguf: Path, **extra: object) -> dict[str, object]:
    # One thread: the long streams leave a core to the event loop on small machines.
    return model_entry(model_id, gguf, n_ctx=N_CTX, n_parallel=2, n_threads=1, **extra)


def serve(
    factory: Callable[..., RunningServer],
    tmp: Path,
    entries: list[dict[str, object]],
    preload: list[str],
    env: dict[str, str] | None = None,
) -> RunningServer:
    """A server whose models.yaml holds ``entries``; only ``preload`` load at start-up."""
    tmp.mkdir(parents=True, exist_ok=True)
    models_file = tmp / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": entries}))
    chosen = [e for e in entries if e["id"] in preload]
    return factory(chosen, api_key=None, models_file=models_file, env=env)  # type: ignore[no-any-return]


def cards(server: RunningServer) -> dict[str, dict[str, Any]]:
    data = httpx.get(f"{server.v1}/models", timeout=30).json()["data"]
    return {card["id"]: card for card in data}


def wait_state(server: RunningServer, model_id: str, state: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cards(server)[model_id]["state"] == state:
            return True
        time.sleep(0.2)
    return False


def rss_bytes(server: RunningServer) -> int:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def chat(server: RunningServer, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": HI, "max_tokens": 2, **extra}
    return httpx.post(f"{server.v1}/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def lazy_server(
    server_factory: Callable[..., RunningServer],
    bundled_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    """``start`` loads at start-up; ``lazy`` (keep_alive 2 s) and ``broken`` on demand."""
    tmp = tmp_path_factory.mktemp("lazy")
    corrupt = tmp / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    entries = [
        entry("start", bundled_gguf),
        entry("lazy", bundled_gguf, keep_alive="2s"),
        entry("broken", corrupt),
    ]
    return serve(server_factory, tmp, entries, ["start"])


def test_on_demand_load_then_keep_alive_unload(lazy_server: RunningServer) -> None:
    before = cards(lazy_server)
    assert before["start"]["state"] == "ready" and before["start"]["keep_alive_s"] == -1
    assert before["lazy"]["state"] == "available" and before["lazy"]["memory_bytes"] is None
    assert before["lazy"]["keep_alive_s"] == 2
    rss_idle = rss_bytes(lazy_server)
    with openai.OpenAI(base_url=lazy_server.v1, api_key="x", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model="lazy", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert reply.model == "lazy" and reply.choices[0].message.content is not None
    loaded = cards(lazy_server)["lazy"]
    assert loaded["state"] == "ready" and loaded["in_flight"] == 0
    assert loaded["memory_bytes"] > 250 * MiB
    assert time.time() < loaded["expires_at"] <= time.time() + 2.5
    rss_loaded = rss_bytes(lazy_server)
    assert wait_state(lazy_server, "lazy", "available", 10)
    unloaded = cards(lazy_server)["lazy"]
    assert unloaded["expires_at"] is None and unloaded["idle_s"] is None
    assert cards(lazy_server)["start"]["state"] == "ready"
    # The weights and KV cache went with it (RSS falls back towards the idle level).
    rss_after = rss_bytes(lazy_server)
    assert rss_after < rss_loaded - (rss_loaded - rss_idle) // 2, (rss_idle, rss_loaded, rss_after)
    metrics = httpx.get(f"{lazy_server.base_url}/metrics").text
    assert "ggufserve_models_loaded 1.0" in metrics
    assert 'ggufserve_model_unloads_total{reason="keep_alive"} 1.0' in metrics


def test_request_keep_alive_wins_until_the_next_request(lazy_server: RunningServer) -> None:
    assert chat(lazy_server, "lazy", keep_alive=-1).status_code == 200
    card = cards(lazy_server)["lazy"]
    assert card["keep_alive_s"] == -1 and card["expires_at"] is None
    time.sleep(3)  # longer than the entry's 2 s: the request's "forever" holds
    assert cards(lazy_server)["lazy"]["state"] == "ready"
    assert chat(lazy_server, "lazy", keep_alive=0).status_code == 200
    assert wait_state(lazy_server, "lazy", "available", 5)


def long_stream(model: str, **extra: Any) -> dict[str, Any]:
    """A stream that runs for many seconds (ends when the client goes away)."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Count to one thousand."}],
        "max_tokens": N_CTX - 64,
        "logit_bias": NO_EOG,
        "stream": True,
        **extra,
    }


def test_model_is_not_unloaded_while_a_stream_runs(lazy_server: RunningServer) -> None:
    with (
        httpx.Client(base_url=lazy_server.base_url, timeout=120) as own,
        own.stream(
            "POST", "/v1/chat/completions", json=long_stream("lazy", keep_alive="1s")
        ) as response,
    ):
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        time.sleep(2.5)  # well past keep_alive: the stream's request keeps the model
        card = cards(lazy_server)["lazy"]
        assert card["state"] == "ready" and card["in_flight"] == 1
        assert card["expires_at"] is None
        more = [next(lines) for _ in range(5)]
        assert all('"content"' in line for line in more)
    # The client went away: the request ends, its lease too, then keep_alive runs out.
    assert wait_state(lazy_server, "lazy", "available", 10)


def test_failed_on_demand_load_is_a_503_and_the_server_goes_on(
    lazy_server: RunningServer,
) -> None:
    error = assert_envelope(chat(lazy_server, "broken"), 503, code="model_load_failed")
    assert "corrupt" not in error["message"]
    again = chat(lazy_server, "broken")
    assert_envelope(again, 503, code="model_load_failed")
    assert 1 <= int(again.headers["retry-after"]) <= 30
    assert cards(lazy_server)["broken"]["state"] == "failed"
    assert chat(lazy_server, "start").status_code == 200
    assert httpx.get(f"{lazy_server.base_url}/health").json()["status"] == "ok"


def test_bad_keep_alive_is_a_400(lazy_server: RunningServer) -> None:
    for bad in ("5 minutes", "1x", True, [1], "nan"):
        response = chat(lazy_server, "start", keep_alive=bad)
        assert_envelope(response, 400, param="keep_alive")
    embed = httpx.post(
        f"{lazy_server.v1}/embeddings", json={"model": "start", "input": "x", "keep_alive": "?"}
    )
    assert_envelope(embed, 400, param="keep_alive")


@pytest.fixture(scope="module")
def budget_server(
    server_factory: Callable[..., RunningServer],
    bundled_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> RunningServer:
    """``a`` and ``b``: the same GGUF under two ids, a budget that fits one of them;
    ``huge``: a context whose KV cache alone exceeds the budget."""
    one = estimate_bytes(bundled_gguf, None, n_ctx=N_CTX)
    entries = [
        entry("a", bundled_gguf),
        entry("b", bundled_gguf),
        {**entry("huge", bundled_gguf), "n_ctx": 131072},
    ]
    env = {"GGUFSERVE_MAX_MEMORY": str(one * 3 // 2)}
    return serve(server_factory, tmp_path_factory.mktemp("budget"), entries, ["a"], env)


def test_budget_evicts_the_idle_model(budget_server: RunningServer) -> None:
    assert cards(budget_server)["a"]["state"] == "ready"
    assert chat(budget_server, "b").status_code == 200
    now = cards(budget_server)
    assert now["a"]["state"] == "available" and now["b"]["state"] == "ready"
    metrics = httpx.get(f"{budget_server.base_url}/metrics").text
    assert 'ggufserve_model_unloads_total{reason="memory"} 1.0' in metrics
    # /health keeps answering for the start-up model: it can be loaded again.
    assert httpx.get(f"{budget_server.base_url}/health").status_code == 200


def test_busy_model_is_not_evicted(budget_server: RunningServer) -> None:
    assert chat(budget_server, "b").status_code == 200  # b loaded
    with (
        httpx.Client(base_url=budget_server.base_url, timeout=120) as own,
        own.stream("POST", "/v1/chat/completions", json=long_stream("b")) as response,
    ):
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        refused = chat(budget_server, "a")
        assert '"content"' in next(lines)  # the stream goes on
    error = assert_envelope(refused, 503, code="insufficient_memory")
    assert "'a'" in error["message"] and "MiB" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    deadline = time.monotonic() + 10
    while cards(budget_server)["b"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert chat(budget_server, "a").status_code == 200  # b is idle now: evicted
    assert cards(budget_server)["b"]["state"] == "available"


def test_model_that_can_never_fit(budget_server: RunningServer) -> None:
    for _ in range(2):  # the second answer comes from the known estimate, without a load
        response = chat(budget_server, "huge")
        error = assert_envelope(response, 503, code="model_too_large")
        assert "'huge'" in error["message"] and "MiB" in error["message"]
        assert "--max-memory" in error["message"]
        assert "retry-after" not in response.headers
    card = cards(budget_server)["huge"]
    assert card["state"] == "available" and card["memory_bytes"] > 2000 * MiB
    assert httpx.get(f"{budget_server.base_url}/health").status_code == 200
    assert chat(budget_server, "a").status_code == 200


class TinyCatalog:
    """A catalog as the model store offers one: entries, and hold/release calls recorded."""

    def __init__(self, entries: list[ModelEntry]):
        self.offered = entries
        self.held: list[str] = []
        self.released: list[str] = []

    def entries(self) -> list[ModelEntry]:
        return list(self.offered)

    def hold(self, model_id: str) -> Callable[[], None]:
        self.held.append(model_id)
        return lambda: self.released.append(model_id)


@pytest.fixture
def catalog_app(bundled_gguf: Path) -> Iterator[tuple[TestClient, TinyCatalog]]:
    """In-process app: ``local`` from models.yaml; the catalog offers ``stored`` and a
    second ``local`` (models.yaml wins). Requests do not wait for loads (timeout 0)."""

    def make(model_id: str) -> ModelEntry:
        return ModelEntry(id=model_id, gguf=FileSource(path=str(bundled_gguf)), n_ctx=512)

    catalog = TinyCatalog([make("stored"), make("local")])
    settings = ServerSettings(load_timeout_s=0, startup_check=False)
    registry = ModelRegistry([make("local")], Path("."), settings, catalog=catalog)
    with TestClient(create_app(settings, registry)) as client:
        yield client, catalog


def test_catalog_model_loads_holds_and_releases(
    catalog_app: tuple[TestClient, TinyCatalog],
) -> None:
    client, catalog = catalog_app
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert ids == ["local", "stored"]
    body = {"model": "stored", "messages": HI, "max_tokens": 2, "keep_alive": 0}
    first = client.post("/v1/chat/completions", json=body)
    assert_envelope(first, 503, code="model_loading")
    assert first.headers["retry-after"] == "5"
    chat_once_loaded(client, body)
    assert catalog.held == ["stored"]
    wait_released(catalog, ["stored"])  # keep_alive 0: unloaded, files released
    catalog.offered = [e for e in catalog.offered if e.id != "stored"]  # ggufserve rm
    assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["local"]
    assert_envelope(client.post("/v1/chat/completions", json=body), 404, code="model_not_found")


def chat_once_loaded(client: TestClient, body: dict[str, Any]) -> None:
    """Repeat a chat request while its model loads (503) until it answers 200."""
    deadline = time.monotonic() + 60
    response = client.post("/v1/chat/completions", json=body)
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def wait_released(catalog: TinyCatalog, expected: list[str]) -> None:
    deadline = time.monotonic() + 5
    while catalog.released != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert catalog.released == expected


def eventually(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Wait for ``condition`` (the loader thread settles the heap just after a load or an
    unload, while the request that asked for it may already be answered)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition()


def frozen(obj: object) -> bool:
    """Out of every collector pass: tracked, yet in no generation."""
    return gc.is_tracked(obj) and not any(other is obj for other in gc.get_objects())


def test_loaded_models_leave_the_collector_and_unloads_free_them(
    catalog_app: tuple[TestClient, TinyCatalog],
) -> None:
    # Long-lived objects are frozen (full GC passes skip them: a pass over the start-up heap
    # held the GIL 32 ms); gc.get_objects() lists only what the passes still visit.
    client, catalog = catalog_app
    assert gc.get_freeze_count() > 10_000  # the start-up heap
    body = {"model": "stored", "messages": HI, "max_tokens": 2, "keep_alive": "5m"}
    chat_once_loaded(client, body)
    parts = client.app.state.registry.lookup("stored").parts  # type: ignore[attr-defined]
    engine = parts.engine
    del parts
    assert gc.is_tracked(engine)
    eventually(functools.partial(frozen, engine))
    gone = weakref.ref(engine)
    del engine
    chat_once_loaded(client, {**body, "keep_alive": 0})
    wait_released(catalog, ["stored"])
    eventually(lambda: gone() is None)  # unloaded: not kept alive in the frozen set
