"""Server faults survived, with real servers and the bundled Gemma 3 270M: ``kill -9``
mid-stream, then a restart on the same port and store serves normally; a model file
deleted, truncated or overwritten before its on-demand load is a 503
``model_load_failed`` for that model only, while another model's stream runs on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ggufserve.store.model_store import ModelStore
from tests.cli.test_store import cli
from tests.conftest import (
    NO_EOG,
    REPO,
    STARTUP_TIMEOUT_S,
    RunningServer,
    model_entry,
    wait_for_status,
)
from tests.e2e.test_errors import assert_envelope

pytestmark = pytest.mark.e2e

STORED_ID = "gemma-3-270m-q4_k_m"
HI = [{"role": "user", "content": "Hi"}]


def stream_chat(server: RunningServer, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """A whole streamed reply's chunks (raises if the stream breaks before ``[DONE]``)."""
    body = {"model": model, "messages": HI, "max_tokens": max_tokens, "stream": True,
            "logit_bias": NO_EOG}  # fmt: skip
    chunks = []
    url = f"{server.v1}/chat/completions"
    with httpx.stream("POST", url, json=body, headers=server.headers(), timeout=120) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line == "data: [DONE]":
                return chunks
            if line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def finish_reason(chunks: list[dict[str, Any]]) -> str | None:
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    return next((r for r in reversed(reasons) if r), None)


def restart(killed: RunningServer, env: dict[str, str], log_path: Path) -> RunningServer:
    """The same command line (port, models file, store) started again."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            killed.process.args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    server = RunningServer(killed.base_url, process, log_path, killed.api_key)

    def exited() -> str | None:
        return None if process.poll() is None else f"restart exited:\n{server.log()}"

    if not wait_for_status(f"{server.base_url}/health", (200,), STARTUP_TIMEOUT_S, exited):
        server.stop()
        raise AssertionError(f"restart not ready:\n{server.log()}")
    return server


def test_kill_9_mid_stream_then_restart_on_the_same_port_and_store(
    bundled_gguf: Path, tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    home = tmp_path / "home"
    assert cli(home, "pull", str(bundled_gguf)).returncode == 0
    models_file = tmp_path / "models.yaml"
    entry = model_entry("yaml-model", bundled_gguf, n_ctx=1024, n_threads=1)
    models_file.write_text(yaml.safe_dump({"models": [entry]}))
    env = {"GGUFSERVE_HOME": str(home)}
    # Serves the store's model (it holds a lock on the store entry while loaded).
    first = server_factory([{"id": STORED_ID}], models_file=models_file, env=env)
    body = {"model": STORED_ID, "messages": HI, "max_tokens": 400, "stream": True,
            "logit_bias": NO_EOG}  # fmt: skip
    url = f"{first.v1}/chat/completions"
    received = 0
    # The kill lands inside the stream: reading on breaks the connection.
    with (
        pytest.raises(httpx.TransportError),
        httpx.stream("POST", url, json=body, headers=first.headers(), timeout=60) as reply,
    ):
        assert reply.status_code == 200
        for line in reply.iter_lines():
            received += '"content"' in line
            if received == 3:
                first.process.send_signal(signal.SIGKILL)
    assert first.process.wait(30) == -signal.SIGKILL
    assert received >= 3

    second = restart(first, {**os.environ, **env}, tmp_path / "restart.log")
    try:
        chunks = stream_chat(second, STORED_ID, 8)
        assert finish_reason(chunks) == "length"
        assert "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        plain = httpx.post(
            url, json={"model": STORED_ID, "messages": HI, "max_tokens": 4},
            headers=second.headers(), timeout=120,
        )  # fmt: skip
        assert plain.status_code == 200, plain.text
        assert httpx.get(f"{second.base_url}/health", timeout=5).json()["status"] == "ok"
        assert [r.id for r in ModelStore(home).records()] == [STORED_ID]
        assert "Traceback" not in second.log()
    finally:
        second.stop()
    # The killed server's hold on the entry died with it: nothing is stuck.
    assert cli(home, "rm", STORED_ID).returncode == 0


def broken_copies(bundled_gguf: Path, folder: Path) -> dict[str, Path]:
    """Whole copies of the bundled GGUF, to be broken once the server has started."""
    folder.mkdir()
    copies = {}
    for name in ("deleted", "truncated", "overwritten"):
        copies[name] = folder / f"{name}.gguf"
        shutil.copyfile(bundled_gguf, copies[name])
    return copies


def test_model_file_broken_before_its_load_fails_that_model_only(
    bundled_gguf: Path, tmp_path: Path, server_factory: Callable[..., RunningServer]
) -> None:
    copies = broken_copies(bundled_gguf, tmp_path / "files")
    entries = [model_entry("good", bundled_gguf, n_ctx=1024, n_threads=1)]
    entries += [model_entry(name, path, n_ctx=1024, n_threads=1) for name, path in copies.items()]
    models_file = tmp_path / "models.yaml"
    models_file.write_text(yaml.safe_dump({"models": entries}))
    server = server_factory([entries[0]], models_file=models_file)

    copies["deleted"].unlink()
    size = copies["truncated"].stat().st_size
    os.truncate(copies["truncated"], size // 2)
    with copies["overwritten"].open("r+b") as handle:
        handle.seek(24)  # the first metadata key's length, then the keys themselves
        handle.write(b"\xff" * 65536)

    # A long stream on the good model runs while the broken ones fail to load.
    streamed: list[list[dict[str, Any]]] = []
    runner = threading.Thread(target=lambda: streamed.append(stream_chat(server, "good", 64)))
    runner.start()
    url = f"{server.v1}/chat/completions"
    for name in copies:
        reply = httpx.post(
            url, json={"model": name, "messages": HI, "max_tokens": 2}, headers=server.headers(),
            timeout=120,
        )  # fmt: skip
        error = assert_envelope(reply, 503, code="model_load_failed")
        assert error["message"] == f"The model '{name}' failed to load; see the server log."
        assert f"{name}.gguf" not in reply.text and str(tmp_path) not in reply.text
    runner.join(120)
    assert streamed and finish_reason(streamed[0]) == "length"
    cards = httpx.get(f"{server.v1}/models", headers=server.headers(), timeout=30).json()["data"]
    states = {card["id"]: card["state"] for card in cards}
    assert states == {"good": "ready", "deleted": "failed", "truncated": "failed",
                      "overwritten": "failed"}  # fmt: skip
    again = httpx.post(
        url, json={"model": "good", "messages": HI, "max_tokens": 2}, headers=server.headers(),
        timeout=120,
    )  # fmt: skip
    assert again.status_code == 200, again.text
    assert httpx.get(f"{server.base_url}/health", timeout=5).json()["status"] == "ok"
    log = server.log()
    assert "Traceback" not in log
    assert all(f"model '{name}' failed to load" in log for name in copies)
