"""One bundled-model :class:`ggufserve.Model` for the whole folder (loading costs ~1 s; one
keeps the folder fast), with embeddings and 8 sequences decoded together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import ggufserve


@pytest.fixture(scope="session")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model store (never the user's ~/.cache/ggufserve)."""
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="session")
def model(bundled_gguf: Path, store_home: Path) -> Iterator[ggufserve.Model]:
    with ggufserve.load(
        bundled_gguf, home=store_home, n_ctx=4096, n_parallel=8, embeddings=True
    ) as loaded:
        yield loaded
