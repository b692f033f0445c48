"""The registry in-process on the bundled model: a lease hands the loaded parts it holds
(looked up once, never None), releases once, and the loader knows the registry only
through its :class:`LoaderContext` (no import back: the circle stays broken)."""

from __future__ import annotations

import ast
import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ggufserve.models.loader as loader_module
from ggufserve.models.registry import ModelRegistry, ModelState
from ggufserve.models.served_model import Lease
from ggufserve.settings import ModelEntry, ServerSettings
from tests.conftest import model_entry


@pytest.fixture(scope="module")
def registry(bundled_gguf: Path) -> Iterator[ModelRegistry]:
    entries = [
        ModelEntry.model_validate(model_entry(i, bundled_gguf, n_ctx=256, n_threads=1))
        for i in ("a", "b")
    ]
    registry = ModelRegistry(entries, Path("."), ServerSettings(), preload=["a"])
    registry.start_loading()
    registry.wait_loaded(timeout_s=120)
    yield registry
    registry.close()


def test_loader_does_not_import_the_registry() -> None:
    source = Path(loader_module.__file__).read_text(encoding="utf-8")
    imported = [
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    ]
    assert "ggufserve.models.served_model" in imported  # the scan sees imports
    assert not [m for m in imported if m.endswith("registry")]


def test_lease_hands_the_loaded_parts(registry: ModelRegistry) -> None:
    async def lease_twice() -> tuple[Lease, Lease]:
        return await registry.acquire("a"), await registry.acquire("default")

    first, second = asyncio.run(lease_twice())
    served = registry.lookup("a")
    assert first.served is second.served is served
    assert first.parts is second.parts is served.parts
    assert first.parts.engine.info.n_ctx == 256
    assert served.in_flight == 2
    first.release()
    first.release()  # idempotent: one release per lease
    assert served.in_flight == 1
    second.release()
    assert served.in_flight == 0 and served.state is ModelState.READY


def test_on_demand_lease_loads_and_unload_forgets_the_parts(registry: ModelRegistry) -> None:
    served = registry.lookup("b")
    assert served.state is ModelState.AVAILABLE and served.parts is None
    assert not served.serves_tools
    before = registry.stats["loads"]
    lease = asyncio.run(registry.acquire("b", keep_alive_s=0))
    assert lease.parts is served.parts and served.serves_tools  # Gemma 3 calls tools
    assert registry.stats["loads"] == before + 1
    lease.release()  # keep_alive 0: the loader unloads it once idle
    deadline = time.monotonic() + 10
    while served.state is not ModelState.AVAILABLE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served.state is ModelState.AVAILABLE and served.parts is None
    assert served.serves_tools  # kept: /v1/models still lists "tools"
    assert registry.stats["unloads_keep_alive"] == 1
