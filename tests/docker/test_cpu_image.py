"""The CPU image builds and works: ``convert --help``, ``doctor`` and one chat completion
inside it. Skipped, saying so, where no Docker daemon answers (the build needs one)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for_status

REPO = Path(__file__).resolve().parents[2]
IMAGE = "ggufserve:test-cpu"
BUILD_TIMEOUT_S = 3600


def _daemon_problem() -> str | None:
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker client unusable: {exc.__class__.__name__}"
    if done.returncode != 0:
        return (done.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module")
def image() -> str:
    problem = _daemon_problem()
    if problem is not None:
        pytest.skip(f"no Docker daemon reachable, CPU image not built: {problem}")
    subprocess.run(
        ["docker", "build", "-f", "docker/Dockerfile.cpu", "-t", IMAGE, "."],
        cwd=REPO, check=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    return IMAGE


def run_in(image: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", "run", "--rm", image, *command],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def test_convert_help_runs_in_the_image(image):
    done = run_in(image, "ggufserve", "convert", "--help")
    assert done.returncode == 0, done.stderr
    assert "--quant" in done.stdout


def test_doctor_passes_and_no_amx_variant_is_shipped(image):
    done = run_in(image, "ggufserve", "doctor", "--models", "/app/models.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": ok: generated 8 tokens" in done.stdout
    listing = run_in(image, "ls", "/opt/ggml-backends").stdout.split()
    assert "libggml-cpu-haswell.so" in listing
    assert "libggml-cpu-sapphirerapids.so" not in listing


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[str]:
    port = free_port()
    started = subprocess.run(
        ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8080", image],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    container_id = started.stdout.strip()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_status(f"{base}/health", (200,), 180)
        yield base
    finally:
        subprocess.run(["docker", "stop", container_id], capture_output=True, check=False)


def test_chat_completion_in_the_image(container):
    reply = httpx.post(
        f"{container}/v1/chat/completions",
        json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["message"]["content"]
