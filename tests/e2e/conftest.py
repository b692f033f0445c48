"""Fixtures for end-to-end tests: SDK clients bound to the main test server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp
import openai
import pytest

from tests.conftest import API_KEY, RunningServer

MODEL = "gemma-3-270m"


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    """The official SDK, unmodified, pointed at the real server (closed at the end)."""
    with openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def vocab(bundled_gguf: Path) -> llama_cpp.Llama:
    """The bundled model's tokenizer only, loaded in the test process."""
    return llama_cpp.Llama(str(bundled_gguf), vocab_only=True, verbose=False)
