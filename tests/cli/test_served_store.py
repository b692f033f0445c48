"""A running server serves store models without models.yaml edits: loaded on demand,
listed by ``ggufserve ps``, protected from ``ggufserve rm`` while loaded."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.cli.test_store import cli
from tests.conftest import API_KEY, RunningServer, model_entry


def test_store_model_on_demand_ps_and_rm(
    bundled_gguf: Path, tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    home = tmp_path / "home"
    assert cli(home, "pull", str(bundled_gguf)).returncode == 0
    stored_id = "gemma-3-270m-q4_k_m"
    server = server_factory(
        [model_entry("yaml-model", bundled_gguf, n_ctx=1024)],
        env={"GGUFSERVE_HOME": str(home)},
    )
    headers = server.headers()
    cards = httpx.get(f"{server.v1}/models", headers=headers).json()["data"]
    assert {c["id"]: c["state"] for c in cards} == {"yaml-model": "ready", stored_id: "available"}
    idle = cli(home, "ps", "--url", server.base_url, "--api-key", API_KEY)
    assert idle.returncode == 0, idle.stderr
    assert [line.split()[0] for line in idle.stdout.splitlines()[1:]] == ["yaml-model"]

    reply = httpx.post(
        f"{server.v1}/chat/completions",
        headers=headers,
        json={"model": stored_id, "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 3, "keep_alive": "1h"},
        timeout=120,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    listing = cli(home, "ps", "--url", server.base_url, "--api-key", API_KEY)
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {"yaml-model", stored_id}
    assert "ready" in rows[stored_id] and "MB" in rows[stored_id] and "in 3" in rows[stored_id]
    assert "never" in rows["yaml-model"]

    refused = cli(home, "rm", stored_id)
    assert refused.returncode == 1 and "loaded by a running server" in refused.stderr

    # keep_alive 0 unloads right after the request; the files are then free to remove.
    again = httpx.post(
        f"{server.v1}/chat/completions",
        headers=headers,
        json={"model": stored_id, "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 1, "keep_alive": 0},
        timeout=120,
    )  # fmt: skip
    assert again.status_code == 200, again.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cards = httpx.get(f"{server.v1}/models", headers=headers).json()["data"]
        if {c["id"]: c["state"] for c in cards}[stored_id] == "available":
            break
        time.sleep(0.5)
    removed = cli(home, "rm", stored_id)
    assert removed.returncode == 0, removed.stderr
    cards = httpx.get(f"{server.v1}/models", headers=headers).json()["data"]
    assert [c["id"] for c in cards] == ["yaml-model"]
    down = cli(home, "ps", "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "no server answers" in down.stderr
