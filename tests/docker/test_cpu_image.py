"""The CPU image works: /health, a chat completion on the bundled model, an image chat on
the tiny vision model mounted in, ``doctor`` and ``convert --help`` inside, a non-root
user with the store in a volume, no AMX variant shipped, and SIGTERM draining a stream.
Runs only with ``GGUFSERVE_IMAGE_TESTS=1`` (``make image-test``): see conftest.py."""

from __future__ import annotations

import base64
import io
import uuid

import httpx
import pytest
from PIL import Image

from tests.conftest import NO_EOG
from tests.docker.conftest import IMAGE, Container, Engine, remove, start_container

pytestmark = [pytest.mark.docker]


def in_image(engine: Engine, *command: str, volume: str | None = None) -> str:
    """stdout of ``command`` in a fresh container; fails the test on a non-zero exit."""
    mounts = ["-v", f"{volume}:/data"] if volume else []
    done = engine.run("run", "--rm", *mounts, IMAGE, *command)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_health_and_chat_completion(container: Container) -> None:
    assert httpx.get(f"{container.base_url}/health", timeout=10).status_code == 200
    reply = httpx.post(
        f"{container.base_url}/v1/chat/completions",
        json={"model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 8},
        timeout=120,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] > 0
    assert body["choices"][0]["message"]["content"]


def png(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (112, 112), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_image_chat_on_the_mounted_vision_model(container: Container) -> None:
    def ask(content: object) -> dict:
        reply = httpx.post(
            f"{container.base_url}/v1/chat/completions",
            json={"model": "tiny-vision", "messages": [{"role": "user", "content": content}],
                  "max_tokens": 4, "temperature": 0},
            timeout=180,
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        return reply.json()

    text = "What is in the picture?"
    alone = ask(text)["usage"]["prompt_tokens"]
    with_image = ask([{"type": "image_url", "image_url": {"url": png((255, 0, 0))}},
                      {"type": "text", "text": text}])  # fmt: skip
    # The tiny tower's 16 image tokens plus the start/end-of-image markers and a newline.
    assert with_image["usage"]["prompt_tokens"] - alone == 16 + 3
    assert with_image["choices"][0]["finish_reason"] in ("stop", "length")


def test_doctor_passes_and_no_amx_variant_is_shipped(engine: Engine) -> None:
    report = in_image(engine, "ggufserve", "doctor", "--models", "/app/models.yaml")
    assert ": ok: generated 8 tokens" in report
    listing = in_image(engine, "ls", "/opt/ggml-backends").split()
    assert "libggml-cpu-haswell.so" in listing
    assert "libggml-cpu-sapphirerapids.so" not in listing


def test_convert_help_runs_in_the_image(engine: Engine) -> None:
    assert "--quant" in in_image(engine, "ggufserve", "convert", "--help")


def test_runs_as_non_root_with_the_store_in_a_volume(engine: Engine) -> None:
    volume = f"ggufserve-test-store-{uuid.uuid4().hex[:8]}"
    try:
        out = in_image(
            engine, "sh", "-c", 'id -u; echo "$GGUFSERVE_HOME"; touch /data/probe && ls /data',
            volume=volume,
        )  # fmt: skip
        assert out.split() == ["10001", "/data", "probe"]
        assert "probe" in in_image(engine, "ls", "/data", volume=volume)  # it persists
    finally:
        engine.run("volume", "rm", "-f", volume, timeout=60)


def test_sigterm_drains_a_running_stream(engine: Engine) -> None:
    running = start_container(engine)
    try:
        body = {
            "model": "gemma-3-270m", "stream": True, "max_tokens": 60, "logit_bias": NO_EOG,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        }  # fmt: skip
        with (
            httpx.Client(base_url=running.base_url, timeout=120) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            next(lines)
            killed = engine.run("kill", "--signal", "TERM", running.id, timeout=30)
            assert killed.returncode == 0, killed.stderr
            chunks = [line for line in lines if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]"
        assert '"finish_reason":"length"' in chunks[-2]
        exited = engine.run("wait", running.id, timeout=90)
        assert exited.stdout.strip() == "0", running.logs()
    finally:
        remove(running)
